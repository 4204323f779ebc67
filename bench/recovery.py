"""Recovering accuracy after pruning, two ways, same budget, same machine:
(a) plain fine-tuning with cross-entropy (what Torch-Pruning's examples do);
(b) BatchNorm re-calibration + fine-tuning with distillation from the unpruned model (edgeprune's default).

    EDGEPRUNE_HOME=../shared/data python bench/recovery.py [--epochs 5] [--macs-reduction 0.505]

Starts from the JPEG-adapted ResNet-56 (resnet56-cifar10jpeg.pth) on cifar10-jpeg; writes
bench/results/recovery.json and .md with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from edgeprune import load_recipe
from edgeprune.pipeline import run

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "a_plain_ce": {"recover.recalibrate": False, "recover.distill": False},
    "b_bnrecal_kd": {"recover.recalibrate": True, "recover.distill": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--macs-reduction", type=float, default=0.505)
    parser.add_argument("--train-images", type=int, default=None, help="images per epoch (default: all 50,000)")
    parser.add_argument("--work", default="bench/work/recovery", help="run folders (resumable)")
    args = parser.parse_args()
    rows = []
    for name, overrides in VARIANTS.items():
        recipe = load_recipe(overrides={
            "model.weights": "cifar10-jpeg", "prune.macs_reduction": args.macs_reduction, "prune.allocation": "uniform",
            "recover.epochs": args.epochs, "recover.train_images": args.train_images,
            "recover.eval_every_epoch": True, **overrides})
        report = run(recipe, Path(args.work) / name, quiet=True, resume=True)
        epochs = report["finetuned"]["epochs"]
        row = {
            "name": name,
            "macs": [report["baseline"]["macs"], report["pruned"]["macs"]],
            "params": [report["baseline"]["params"], report["pruned"]["params"]],
            "top1": {"baseline": report["baseline"]["top1"], "pruned": report["pruned"]["top1"],
                     **({"recalibrated": report["recalibrated"]["top1"]} if "recalibrated" in report else {}),
                     **{f"epoch{e['epoch']}": e["top1"] for e in epochs},
                     "finetuned": report["finetuned"]["top1"], "onnx": report["onnx"]["top1"]},
            "finetune_seconds": round(sum(e["seconds"] for e in epochs), 1),
            "recipe": report["recipe"]["recover"], "environment": report["environment"],
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "top1", "finetune_seconds")}), flush=True)
    command = "EDGEPRUNE_HOME=../shared/data python bench/recovery.py " + shlex.join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps({"command": command.strip(), "variants": rows}, indent=2))
    base = rows[0]
    stages = ["baseline", "pruned", "recalibrated", *[f"epoch{e}" for e in range(1, args.epochs + 1)], "onnx"]
    lines = ["# Recovery after pruning: plain CE fine-tuning vs BN re-calibration + distillation", "",
             f"Command: `{command.strip()}`", "",
             f"ResNet-56 (JPEG-adapted), MACs {base['macs'][0] / 1e6:.1f}M -> {base['macs'][1] / 1e6:.1f}M "
             f"({base['macs'][0] / base['macs'][1]:.2f}x), params {base['params'][0] / 1e3:.0f}K -> "
             f"{base['params'][1] / 1e3:.0f}K; top-1 on cifar10-jpeg/test (10,000 images); "
             f"{args.epochs} epochs, SGD nesterov, batch 128, warm-up + cosine, on {base['environment']['cpu']}.", "",
             "Columns: top-1 (%) at each stage; `onnx` is the exported model of the last epoch run by ONNX Runtime.",
             "", "| variant | " + " | ".join(stages) + " | fine-tune s |", "|---|" + "---:|" * (len(stages) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['top1'][s]:.2f}" if s in r["top1"] else "" for s in stages)
                     + f" | {r['finetune_seconds']:.0f} |")
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

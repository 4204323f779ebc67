"""Before/after table of the study we start from, measured here: one `edgeprune.run` per setting.

    python bench/prune_table.py                       # ResNet-50 (random init) at ratio 0.7, round_to none/8/16
    python bench/prune_table.py --model cifar_resnet56 --weights default --macs-reduction 0.5

Writes bench/results/<name>.json and .md with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from edgeprune import run
from edgeprune.recipe import Recipe, apply_overrides

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--macs-reduction", type=float, default=None)
    parser.add_argument("--round-to", nargs="*", default=["none", "8", "16"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    target = ({"prune.macs_reduction": args.macs_reduction} if args.macs_reduction
              else {"prune.ratio": args.ratio})
    rows = []
    for round_to in args.round_to:
        recipe = apply_overrides(Recipe(), {"model.name": args.model, "model.weights": args.weights, **target,
                                            "prune.round_to": None if round_to == "none" else int(round_to),
                                            "latency.repeats": args.repeats})
        with tempfile.TemporaryDirectory() as out:
            report = run(recipe, out, quiet=True)
        b, p = report["baseline"], report["pruned"]
        rows.append({"round_to": round_to, "ratio": report["prune"]["ratio"],
                     "macs": [b["macs"], p["macs"]], "params": [b["params"], p["params"]],
                     "onnx_bytes": [b["onnx_bytes"], p["onnx_bytes"]],
                     "torch_cpu_ms": [b["latency_ms"]["torch_cpu"], p["latency_ms"]["torch_cpu"]],
                     "ort_cpu_ms": [b["latency_ms"]["ort_cpu"], p["latency_ms"]["ort_cpu"]],
                     "max_abs_diff": report["onnx_parity"]["max_abs_diff"], "environment": report["environment"]})
        print(json.dumps(rows[-1]), flush=True)
    command = "python bench/prune_table.py " + shlex.join(sys.argv[1:])
    target_name = f"macs{args.macs_reduction}" if args.macs_reduction else f"ratio{args.ratio}"
    name = args.name or f"{args.model}-{target_name}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2))
    lines = [f"# {args.model}: before -> after", "", f"Command: `{command.strip()}`", "",
             f"Median of {args.repeats} runs, batch 1, 2 threads, baseline and pruned timed side by side on "
             f"{rows[0]['environment']['cpu']}.", "",
             "| round_to | ratio | MACs | params | ONNX MB | PyTorch CPU ms | ORT CPU ms | ORT speed-up | "
             "MACs reduction | parity |", "|---|---:|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['round_to']} | {r['ratio']:.3f} | {r['macs'][0] / 1e9:.3f}G -> {r['macs'][1] / 1e9:.3f}G | "
            f"{r['params'][0] / 1e6:.2f}M -> {r['params'][1] / 1e6:.2f}M | "
            f"{r['onnx_bytes'][0] / 1e6:.1f} -> {r['onnx_bytes'][1] / 1e6:.1f} | "
            f"{r['torch_cpu_ms'][0]:.1f} -> {r['torch_cpu_ms'][1]:.1f} | {r['ort_cpu_ms'][0]:.1f} -> "
            f"{r['ort_cpu_ms'][1]:.1f} | {r['ort_cpu_ms'][0] / r['ort_cpu_ms'][1]:.2f}x | "
            f"{r['macs'][0] / r['macs'][1]:.2f}x | {r['max_abs_diff']:.1e} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Deployment figures measured here: INT8, a latency target and the per-layer diagnosis.

    EDGEPRUNE_HOME=../shared/data python bench/deploy.py [--epochs 1] [--repeats 50]

1. INT8 (ONNX Runtime static QDQ) of the JPEG-adapted CIFAR ResNet-56, unpruned and pruned to half
   its MACs + recovered (BN re-calibration, --epochs of distillation), on all 10,000 test images.
2. ResNet-50 (random init) pruned to half its measured ONNX Runtime latency, round_to chosen by
   the search among 1, 8 and 16.
3. ResNet-50 at channel ratio 0.7: measured speed-up against MACs reduction and the findings.

Writes bench/results/deploy.json and deploy.md with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from edgeprune import run
from edgeprune.data import load_split, loader, unaugmented
from edgeprune.environment import environment
from edgeprune.export import export_onnx
from edgeprune.models import create_model
from edgeprune.pipeline import profile_model
from edgeprune.quantize import compare_int8, cpu_lacks_vnni, quantize_int8, reduce_range, top1_of
from edgeprune.recipe import Recipe, apply_overrides

RESULTS = Path(__file__).parent / "results"


def int8_rows(epochs: int, repeats: int) -> list[dict]:
    rows = []
    model = create_model("cifar_resnet56", "cifar10-jpeg")
    spec = model.edgeprune_spec
    recipe = apply_overrides(Recipe(), {"latency.repeats": repeats})
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, spec.input_size, Path(tmp) / "model.onnx", recipe.export)
        train = load_split("cifar10", spec, True)
        # The default (7-bit weights where the CPU lacks VNNI) and both choices forced, on the same files.
        for label, choice in (("default", None), ("7-bit weights", True), ("8-bit weights", False)):
            opts = recipe.int8.model_copy(update={"reduce_range": choice})
            int8 = quantize_int8(fp32, Path(tmp) / "model.int8.onnx", loader(unaugmented(train, spec), 32, limit=256),
                                 opts)
            result = compare_int8(fp32, int8, top1_of(loader(load_split("cifar10", spec, False), 500)), spec.input_size,
                                  recipe.latency)
            rows.append({"model": f"ResNet-56 (unpruned), {label}", "reduce_range": reduce_range(opts), **result})
    pruned = apply_overrides(Recipe(), {"model.name": "cifar_resnet56", "model.weights": "cifar10-jpeg",
                                        "data.path": "cifar10", "prune.macs_reduction": 0.5, "prune.round_to": None,
                                        "recover.epochs": epochs, "int8.enabled": True,
                                        "latency.repeats": repeats, "latency.per_layer": False})
    with tempfile.TemporaryDirectory() as out:
        report = run(pruned, out, quiet=True)
    rows.append({"model": f"ResNet-56, half MACs, BN re-cal + {epochs} epoch(s) KD", **report["int8"]})
    return rows


def latency_target(repeats: int) -> dict:
    base = apply_overrides(Recipe(), {"model.name": "resnet50", "model.weights": "none", "latency.repeats": repeats})
    model = create_model("resnet50", "none")
    measured = profile_model(model, base)  # exported to a temporary ONNX file and timed
    target = round(measured.latency_ms["ort_cpu"] / 2, 2)
    recipe = apply_overrides(base, {"prune.target_latency_ms": target})
    with tempfile.TemporaryDirectory() as out:
        report = run(recipe, out, quiet=True)
    return {"profiled_ms": measured.latency_ms["ort_cpu"], "target_ms": target, "target": report["target"],
            "baseline_ms": report["baseline"]["latency_ms"]["ort_cpu"],
            "pruned_ms": report["pruned"]["latency_ms"]["ort_cpu"], "macs": [report["baseline"]["macs"],
                                                                             report["pruned"]["macs"]],
            "trials": len(report["prune"]["latency_search"]["trials"]),
            "chosen": report["prune"]["latency_search"]["chosen"]}


def diagnosis(repeats: int) -> dict:
    recipe = apply_overrides(Recipe(), {"model.name": "resnet50", "model.weights": "none", "prune.ratio": 0.7,
                                        "prune.round_to": None, "latency.repeats": repeats})  # unrounded, as recorded
    with tempfile.TemporaryDirectory() as out:
        report = run(recipe, out, quiet=True)
    return {"speedup": report["speedup"], "macs": [report["baseline"]["macs"], report["pruned"]["macs"]],
            "findings": report["diagnostics"]["findings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    command = ("EDGEPRUNE_HOME=../shared/data python bench/deploy.py " + shlex.join(sys.argv[1:])).strip()
    results = {"command": command, "environment": environment(), "cpu_lacks_vnni": cpu_lacks_vnni(),
               "int8": int8_rows(args.epochs, args.repeats)}
    print(json.dumps(results["int8"], indent=1), flush=True)
    results["latency_target"] = latency_target(args.repeats)
    print(json.dumps(results["latency_target"], indent=1), flush=True)
    results["diagnosis"] = diagnosis(args.repeats)
    print(json.dumps(results["diagnosis"], indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deploy.json").write_text(json.dumps(results, indent=2))
    lines = ["# Deployment figures", "", f"Command: `{command}`", "", "## INT8 (ONNX Runtime static QDQ, per-channel, "
             "256 calibration images), all 10,000 cifar10-jpeg test images", "",
             f"CPU: {results['environment']['cpu']}, {'without' if results['cpu_lacks_vnni'] else 'with'} VNNI.", "",
             "| model | top-1 FP32 -> INT8 | agreement | ONNX MB | ORT CPU ms (same run) |", "|---|---|---:|---|---|"]
    for r in results["int8"]:
        f = r["fp32"]
        lines.append(f"| {r['model']} | {f['top1']:.2f} -> {r['top1']:.2f} | {r['top1_agreement']:.2%} | "
                     f"{f['onnx_bytes'] / 1e6:.2f} -> {r['onnx_bytes'] / 1e6:.2f} ({r['size_reduction_x']:.2f}x) | "
                     f"{f['latency_ms']['ort_cpu']:.2f} -> {r['latency_ms']['ort_cpu']:.2f} "
                     f"({r['speedup_vs_fp32']:.2f}x) |")
    t = results["latency_target"]
    lines += ["", "## ResNet-50 to half its measured ONNX Runtime latency", "",
              f"Profiled {t['profiled_ms']:.2f} ms, target {t['target_ms']:.2f} ms; {t['trials']} measured trials "
              f"chose round_to {t['chosen']['round_to']} at ratio {t['chosen']['ratio']:.3f}. Final measurement in the "
              f"same run: baseline {t['baseline_ms']:.2f} ms, pruned {t['pruned_ms']:.2f} ms "
              f"({'met' if t['target']['met'] else 'missed'}), MACs {t['macs'][0] / 1e9:.3f}G -> "
              f"{t['macs'][1] / 1e9:.3f}G.", "", "## ResNet-50 at ratio 0.7: why isn't it faster?", ""]
    lines += [f"- {f}" for f in results["diagnosis"]["findings"]]
    (RESULTS / "deploy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

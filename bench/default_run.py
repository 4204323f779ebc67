"""The default run (`edgeprune run`) as shipped against the same run with one ratio for every layer.

    EDGEPRUNE_HOME=../shared/data python bench/default_run.py [--variants sensitivity uniform] [--repeats 300]

Each variant is the built-in default recipe (src/edgeprune/recipes/default.yaml) run whole, as `edgeprune
run` runs it, in a fresh folder: `sensitivity` is the recipe as shipped (channels spread by the sensitivity
analysis, no channel rounding), `uniform` the default before 2026-11-30 (prune.allocation uniform,
prune.round_to auto). The wall time of each run is measured (nothing else should run on the machine).
Then the unpruned model and every variant's model.onnx and model.int8.onnx are timed side by side in one
process, in turns, on ONNX Runtime and on OpenVINO (batch 1, 2 threads). Writes bench/results/default_run.json
and .md with the command.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "default_run.json"
VARIANTS = {"sensitivity": {}, "uniform": {"prune.allocation": "uniform", "prune.round_to": "auto"},
            # the shipped recipe fine-tuning on 30,000 of the 50,000 training images (a shorter run; see the notes)
            "sensitivity-30k": {"recover.train_images": 30000},
            # the shipped recipe fine-tuning in FP32 (recover.amp off), as before 2026-11-30's bf16 autocast
            "sensitivity-fp32": {"recover.amp": False},
            # the shipped recipe with PyTorch's own batch norm on every layer (recover.packed_batchnorm off; on AVX-512
            # CPUs the layers whose width is not a multiple of 16 train through the packed batch norm by default)
            "sensitivity-unpacked": {"recover.packed_batchnorm": False}}
STAGES = ("baseline", "pruned", "recalibrated", "finetuned", "int8")


def markdown(results: dict) -> str:
    t = results["latency_ms"]
    lines = ["# The default run: sensitivity allocation (as shipped) against uniform allocation", "",
             f"`{results['command']}`", "",
             "| variant | MACs factor | wall s | analysis s | epoch s | fine-tune | " + " | ".join(
                 f"top-1 {s}" for s in STAGES) + " | drop | ORT ms FP32 | ORT ms INT8 | OV ms FP32 | OV ms INT8 |",
             "|---|" + "---:|" * 4 + "---|" + "---:|" * (len(STAGES) + 5)]
    base = t["unpruned"]
    lines.append("| unpruned | 1.00 | | | | | " + " | ".join(["" for _ in STAGES]) + " | | "
                 f"{base['ort_cpu']:.3f} | | {base['ov_cpu']:.3f} | |")
    for v in results["variants"]:
        top1, ms = v["top1"], t[v["name"]]
        lines.append(
            f"| {v['name']} | {v['macs_factor']:.2f} | {v['wall_s']:.0f} | "
            f"{'' if v['sensitivity_s'] is None else format(v['sensitivity_s'], '.0f')} | {v['epoch_s']:.0f} | "
            f"{v.get('precision', 'fp32')} | "
            + " | ".join(format(top1[s], ".2f") for s in STAGES)
            + f" | {top1['baseline'] - top1['finetuned']:.2f} | "
            + " | ".join(f"{ms[k]:.3f} ({base[k.split('_int8')[0]] / ms[k]:.2f}x)"
                         for k in ("ort_cpu", "ort_cpu_int8", "ov_cpu", "ov_cpu_int8")) + " |")
    lines += ["", f"Latency: median of {results['repeats']} runs each, batch 1, {results['threads']} threads, every "
              "file timed in turns in one process after all runs finished (speed-up against the unpruned FP32 model "
              "on the same runtime). Top-1 on all 10,000 cifar10-jpeg test images; int8 through ONNX Runtime.", "",
              *[f"Note: {n}" for n in results.get("notes", [])]]
    return "\n".join(lines) + "\n"


def time_files(files: dict[str, Path], out: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of the unpruned model and of each run folder's model.onnx and model.int8.onnx, on ONNX Runtime
    and OpenVINO, all timed in turns in this process: {variant: {ort_cpu, ort_cpu_int8, ov_cpu, ov_cpu_int8}}."""
    from edgeprune import create_model, load_recipe
    from edgeprune.export import export_onnx
    from edgeprune.measure import ort_runner, ort_waiting, ov_runner, time_interleaved

    recipe = load_recipe(None)
    model, lat = create_model(**recipe.model.model_dump()), recipe.latency
    size = model.edgeprune_spec.input_size
    unpruned = export_onnx(model, size, out / "unpruned.onnx", recipe.export)
    runners = {}
    for runtime, make in (("ort_cpu", lambda p: ort_runner(p, size, 1, lat.threads, **ort_waiting(lat))),
                          ("ov_cpu", lambda p: ov_runner(p, size, 1, lat.threads))):
        runners[f"unpruned/{runtime}"] = make(unpruned)
        for name, folder in files.items():
            runners[f"{name}/{runtime}"] = make(folder / "model.onnx")
            runners[f"{name}/{runtime}_int8"] = make(folder / "model.int8.onnx")
    timed = time_interleaved(runners, lat.model_copy(update={"warmup": 20, "repeats": repeats}))
    result: dict[str, dict[str, float]] = {}
    for key, t in timed.items():
        name, runtime = key.split("/")
        result.setdefault(name, {})[runtime] = round(t.median_ms, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=300, help="timed runs per file")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON to write (and .md beside it)")
    args = parser.parse_args()
    import json

    from edgeprune import load_recipe, run
    from edgeprune.environment import environment
    from edgeprune.fsio import write_json, write_text

    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/default_run.py", *sys.argv[1:]])
    results = {"command": command, "environment": environment(), "variants": [], "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="edgeprune-default-bench-") as tmp:
        out = args.out or Path(tmp)
        files = {}
        for name in args.variants:
            recipe = load_recipe(None, VARIANTS[name])
            folder = out / name
            t0 = time.time()
            report = run(recipe, folder, quiet=True, overwrite=True)
            wall = time.time() - t0
            sens = report.get("sensitivity")
            row = {"name": name, "allocation": recipe.prune.allocation,
                   "round_to": (report["prune"].get("rounding") or {}).get("chosen", report["prune"].get("round_to")),
                   "macs_factor": round(report["baseline"]["macs"] / report["pruned"]["macs"], 3),
                   "wall_s": round(wall, 1), "sensitivity_s": sens["seconds"] if sens else None,
                   "epoch_s": sum(e["seconds"] for e in report["finetuned"]["epochs"]),
                   "precision": report["finetuned"]["precision"],
                   "top1": {s: report[s]["top1"] for s in STAGES},
                   "stage_s": {k: t["seconds"] for k, t in report["timings"].items()},
                   "group_ratios": report["prune"].get("group_ratios")}
            results["variants"].append(row)
            files[name] = folder
            print(json.dumps({k: v for k, v in row.items() if k != "group_ratios"}), flush=True)
        results["threads"] = load_recipe(None).latency.threads
        results["latency_ms"] = time_files(files, out, args.repeats)
    if args.results.exists():  # notes written by hand on earlier results stay
        results["notes"] = json.loads(args.results.read_text()).get("notes", [])
    args.results.parent.mkdir(exist_ok=True)
    write_json(args.results, results)
    write_text(args.results.with_suffix(".md"), markdown(results))
    print(markdown(results), end="")


if __name__ == "__main__":
    main()

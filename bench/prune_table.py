"""Before/after table of the study we start from, measured here: the baseline and every pruned variant
timed side by side in one process.

    python bench/prune_table.py                       # ResNet-50 (random init) at ratio 0.7, round_to none/8/16
    python bench/prune_table.py --model cifar_resnet56 --weights default --macs-reduction 0.5 --round-to none 8

The baseline and each variant (one per --round-to) are built and pruned first, each exported to ONNX
and checked for parity; then all of them are timed in ONE `edgeprune.measure.measure` call, in which
the models take turns within each runtime (each turn: `latency.settle_runs` untimed runs, then
`latency.turn_runs` timed back to back). Every row's speed-up is therefore against the same baseline
measurement, taken under the same load as the variant's.

Writes bench/results/<name>.json (command, environment, the one baseline measurement, the rows) and
<name>.md with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from edgeprune import PruneOptions, create_model, prune
from edgeprune.distributed import seed_everything
from edgeprune.environment import environment
from edgeprune.export import check_parity, export_onnx
from edgeprune.fsio import write_json, write_text
from edgeprune.measure import measure
from edgeprune.recipe import ExportOptions, LatencyOptions
from edgeprune.rows import turns

RESULTS = Path(__file__).parent / "results"
BASELINE = "baseline"


def variant_label(round_to: str) -> str:
    return f"round_to {round_to}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--macs-reduction", type=float, default=None)
    parser.add_argument("--round-to", nargs="*", default=["none", "8", "16"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--name", default=None)
    parser.add_argument("--cuda", action="store_true", help="also time PyTorch on the GPU (when there is one)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per timed run")
    args = parser.parse_args()
    if not args.round_to:
        parser.error("--round-to needs at least one value (none or a channel multiple)")
    if len(set(args.round_to)) != len(args.round_to):
        parser.error(f"--round-to values repeat: {' '.join(args.round_to)}")
    command = ("python bench/prune_table.py " + shlex.join(sys.argv[1:])).strip()
    target = ({"macs_reduction": args.macs_reduction} if args.macs_reduction is not None
              else {"ratio": args.ratio})
    export_opts = ExportOptions()
    latency = LatencyOptions(repeats=args.repeats, cuda=args.cuda, batch_size=args.batch_size)
    seed_everything(0)  # the random init of --weights none, as `edgeprune run` seeds it

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    baseline = create_model(args.model, args.weights)
    spec = baseline.edgeprune_spec
    size = spec.input_size
    with tempfile.TemporaryDirectory(prefix="prune-table-") as tmp:
        # 1. Build, prune, export and check every model before timing any of them.
        log(f"exporting the baseline {args.model}")
        onnx_paths = {BASELINE: export_onnx(baseline, size, Path(tmp) / "baseline.onnx", export_opts)}
        parity = {BASELINE: check_parity(baseline, onnx_paths[BASELINE], size, export_opts)}
        models = {BASELINE: baseline}
        pruned_with = {}
        for round_to in args.round_to:
            label = variant_label(round_to)
            opts = PruneOptions(**target, round_to=None if round_to == "none" else int(round_to))
            log(f"pruning {label} ({', '.join(f'{k} {v}' for k, v in target.items())})")
            pruned, result = prune(baseline, opts)
            path = export_onnx(pruned, size, Path(tmp) / f"round_to-{round_to}.onnx", export_opts)
            parity[label] = check_parity(pruned, path, size, export_opts)
            models[label], onnx_paths[label], pruned_with[label] = pruned, path, result
        # 2. Time all of them together: one call, models interleaved within each runtime.
        log(f"timing {len(models)} models side by side ({args.repeats} runs each per runtime)")
        load_before = os.getloadavg()
        measured = measure({label: (models[label], onnx_paths[label]) for label in models}, size, latency,
                           quiet=False)
        load_after = os.getloadavg()
    base = measured[BASELINE]
    rows = []
    for round_to in args.round_to:
        label = variant_label(round_to)
        m, result = measured[label], pruned_with[label]
        rows.append({
            "label": label, "round_to": round_to, "ratio": result.ratio, "search_trials": result.search_trials,
            "macs_target": result.macs_target, "notes": result.notes,
            "pruned": m.to_dict(), "parity": parity[label].to_dict(),
            "speedup": {k: v / m.latency_ms[k] for k, v in base.latency_ms.items() if m.latency_ms.get(k)},
            "macs_reduction_x": base.macs / m.macs,
        })
        print(json.dumps({k: rows[-1][k] for k in ("label", "ratio", "speedup", "macs_reduction_x")}), flush=True)
    results = {
        "command": command, "environment": environment(), "model": args.model, "weights": args.weights,
        "weights_file": Path(spec.weights).name if spec.weights != "none" else None,
        "input_size": list(size), "target": target, "importance": PruneOptions(**target).importance,
        "latency": latency.model_dump(include={"threads", "warmup", "repeats", "turn_runs", "settle_runs",
                                               "ort_spin_us", "batch_size"}),
        "timing": "every model below timed in one edgeprune.measure.measure call, the models taking turns "
                  "within each runtime",
        "machine_load": {"cpus": os.cpu_count(), "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                         "loadavg_1_5_15_after": [round(x, 2) for x in load_after]},
        "baseline": {**base.to_dict(), "parity": parity[BASELINE].to_dict()},
        "rows": rows,
    }
    target_name = f"macs{args.macs_reduction}" if args.macs_reduction is not None else f"ratio{args.ratio}"
    name = args.name or f"{args.model}-{target_name}"
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{name}.json", results)
    write_text(RESULTS / f"{name}.md", markdown(results))
    log(f"wrote {RESULTS / name}.json and .md")


def load_sentence(load: dict) -> str:
    before, after = load["loadavg_1_5_15_before"][0], load["loadavg_1_5_15_after"][0]
    sentence = (f"1-minute load average {before:.2f} before timing and {after:.2f} after (this process included), "
                f"on {load['cpus']} CPUs")
    if max(before, after) > load["cpus"]:
        sentence += (": other processes competed for the cores, so absolute ms are inflated (PyTorch's "
                     "OpenMP workers most) and only figures from this one run compare")
    return sentence + "."


def markdown(results: dict) -> str:
    base, lat = results["baseline"], results["latency"]
    ov = "ov_cpu" in base["latency_ms"]
    weights = results["weights"] if results["weights_file"] is None else f"{results['weights']} " \
        f"({results['weights_file']} from EDGEPRUNE_HOME)"
    what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in results["target"].items())
    lines = [f"# {results['model']}: before -> after", "", f"Command: `{results['command']}`", "",
             f"Weights {weights}; `{results['importance']}` importance, local, {what}. Median of {lat['repeats']} "
             f"runs after {lat['warmup']} warm-up runs, batch {lat['batch_size']}, {lat['threads']} threads, on "
             f"{results['environment']['cpu']}. The baseline and every variant were timed side by side in one "
             f"process (one measurement call, {turns(lat)} within each runtime): every row's "
             f"\"before\" is the same baseline measurement (PyTorch {base['latency_ms']['torch_cpu']:.1f} ms, "
             f"ONNX Runtime {base['latency_ms']['ort_cpu']:.1f} ms"
             + (f", OpenVINO {base['latency_ms']['ov_cpu']:.1f} ms" if ov else "")
             + f"). {load_sentence(results['machine_load'])}", "",
             "| round_to | ratio | MACs | params | ONNX MB | PyTorch CPU ms | ORT CPU ms | ORT speed-up | "
             + ("OpenVINO ms | OpenVINO speed-up | " if ov else "") + "MACs reduction | parity |",
             "|---|---:|---|---|---|---|---|---:|" + ("---|---:|" if ov else "") + "---:|---:|"]
    for r in results["rows"]:
        p = r["pruned"]
        lines.append(
            f"| {r['round_to']} | {r['ratio']:.3f} | {base['macs'] / 1e9:.3f}G -> {p['macs'] / 1e9:.3f}G | "
            f"{base['params'] / 1e6:.2f}M -> {p['params'] / 1e6:.2f}M | "
            f"{base['onnx_bytes'] / 1e6:.1f} -> {p['onnx_bytes'] / 1e6:.1f} | "
            f"{base['latency_ms']['torch_cpu']:.1f} -> {p['latency_ms']['torch_cpu']:.1f} | "
            f"{base['latency_ms']['ort_cpu']:.1f} -> {p['latency_ms']['ort_cpu']:.1f} | "
            f"{r['speedup']['ort_cpu']:.2f}x | "
            + (f"{base['latency_ms']['ov_cpu']:.1f} -> {p['latency_ms']['ov_cpu']:.1f} | "
               f"{r['speedup']['ov_cpu']:.2f}x | " if ov else "")
            + f"{r['macs_reduction_x']:.2f}x | {r['parity']['max_abs_diff']:.1e} |")
    if "torch_cuda" in base["latency_ms"]:
        gpu = results["environment"].get("gpu")
        lines += ["", f"GPU ({gpu}, PyTorch eager, batch {lat['batch_size']}, synchronized):",
                  "", "| round_to | PyTorch GPU ms | speed-up |", "|---|---|---:|"]
        lines += [f"| {r['round_to']} | {base['latency_ms']['torch_cuda']:.2f} -> "
                  f"{r['pruned']['latency_ms']['torch_cuda']:.2f} | {r['speedup']['torch_cuda']:.2f}x |"
                  for r in results["rows"]]
    same = {}  # variants that came out as one architecture: the gap between their times is noise
    for r in results["rows"]:
        p = r["pruned"]
        same.setdefault((p["macs"], p["params"], p["onnx_bytes"]), []).append(r["round_to"])
    for group in (g for g in same.values() if len(g) > 1):
        lines += ["", f"round_to {' and '.join(group)} produced the same architecture (same MACs, parameters and "
                  "ONNX size): the differences between their latencies are this run's measurement noise."]
    notes = [f"- {r['label']}: {note}" for r in results["rows"] for note in r["notes"]]
    if notes:
        lines += ["", "Pruning notes:", "", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

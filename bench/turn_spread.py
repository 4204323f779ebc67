"""How far one reading of a pruned model's speed-up strays, by how the timing takes turns: the same pair of models
timed again and again with several (repeats, turn_runs, settle_runs) settings, the settings interleaved reading by
reading so that all of them meet the same load.

    EDGEPRUNE_HOME=../shared/data python bench/turn_spread.py [--readings 20] [--settings 30/10/5 30/5/5 60/5/5 ...]

Models: as bench/ort_waiting.py, ResNet-50 (random init) and its `--ratio 0.7` prune with round_to 16, and the
JPEG-adapted CIFAR ResNet-56 and its uniform prune to half the MACs. ONNX Runtime, batch 1, 2 threads, its workers'
bounded spin (`latency.ort_spin_us`). Each reading is one `measure.time_interleaved` call on the two models, as
edgeprune's measure stage makes it; the table gives each setting's median reading, quartiles, extremes and how many
readings fell below 0.8 of the MACs reduction. Writes bench/results/turn_spread.json and .md with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from ort_waiting import models

from edgeprune.environment import environment
from edgeprune.fsio import write_json, write_text
from edgeprune.measure import onnx_runner, time_interleaved
from edgeprune.recipe import LatencyOptions

RESULTS = Path(__file__).parent / "results" / "turn_spread.json"
DEFAULT_SETTINGS = ["30/10/5", "30/5/5", "60/5/5", "60/10/5", "30/1/0"]


def setting(text: str) -> LatencyOptions:
    repeats, turn_runs, settle_runs = (int(x) for x in text.split("/"))
    return LatencyOptions(repeats=repeats, turn_runs=turn_runs, settle_runs=settle_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=20, help="readings of each setting")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="REPEATS/TURN_RUNS/SETTLE_RUNS")
    args = parser.parse_args()
    settings = {s: setting(s) for s in args.settings}
    readings: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeprune-spread-") as tmp:
        pairs = models(Path(tmp))
        # one session per model for every reading: the settings differ only in how time_interleaved takes turns
        sessions = {p: {label: onnx_runner("ort_cpu", path, pair["size"], LatencyOptions())
                        for label, path in pair["onnx"].items()} for p, pair in pairs.items()}
        for i in range(args.readings):
            for p, runners in sessions.items():
                for name, lat in settings.items():
                    t = time_interleaved(runners, lat)
                    readings.setdefault((p, name), []).append(t["unpruned"].median_ms / t["pruned"].median_ms)
            print(f"reading {i + 1}: " + ", ".join(f"{p} {s}: {v[-1]:.2f}x" for (p, s), v in readings.items()),
                  flush=True)
    rows = []
    for (p, name), values in readings.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        macs = pairs[p]["macs_reduction"]
        rows.append({"model": p, "setting": name, "macs_reduction": round(macs, 2), "median": round(median, 3),
                     "q1": round(q1, 3), "q3": round(q3, 3), "min": round(min(values), 3),
                     "max": round(max(values), 3), "below_0.8": sum(v < 0.8 * macs for v in values),
                     "readings": [round(v, 3) for v in values]})
    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/turn_spread.py", *sys.argv[1:]])
    results = {"command": command, "environment": environment(), "readings": args.readings, "rows": rows}
    write_json(RESULTS, results)
    lines = ["# How far one reading of the speed-up strays, by how models take turns", "", f"`{command}`", "",
             f"{results['environment']['cpu']}, ONNX Runtime, 2 threads, batch 1, {args.readings} readings of each "
             "setting (one time_interleaved call of the two models each, the settings interleaved). A setting is "
             "repeats/turn_runs/settle_runs: timed runs of each model, timed runs per turn, untimed runs before "
             "them; 30/1/0 is single runs in turn (edgeprune before measure stage version 2).", "",
             "| model | setting | median | quartiles | min - max | readings below 0.8 of the MACs reduction |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} ({r['macs_reduction']:.2f}x fewer MACs) | {r['setting']} | {r['median']:.2f}x | "
              f"{r['q1']:.2f}-{r['q3']:.2f}x | {r['min']:.2f}-{r['max']:.2f}x | {r['below_0.8']}/{args.readings} |"
              for r in rows]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

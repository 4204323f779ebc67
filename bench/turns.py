"""How models take turns when timed, and what it does to a pruned model's speed-up: single runs in turn (each right
after the other model's; edgeprune's timing before measure stage version 2), settled turns (`latency.settle_runs`
untimed then `latency.turn_runs` timed back to back; the default now), and each model timed alone, warm-ups then
all its runs back to back (how reference-figures.md, onnxruntime_perf_test and OpenVINO's benchmark_app time).

    EDGEPRUNE_HOME=../shared/data python bench/turns.py [--repeats 60] [--rounds 3]

Models: as bench/ort_waiting.py, ResNet-50 (random init) and its `--ratio 0.7` prune with round_to 16, and the
JPEG-adapted CIFAR ResNet-56 and its uniform prune to half the MACs. Batch 1, 2 threads, PyTorch, ONNX Runtime
(bounded spin, `latency.ort_spin_us`) and OpenVINO when installed. In each round every runtime and pair is timed
in the three ways one after another; each figure is the median over the rounds. Also the median of each position
in a turn of 12 back-to-back runs (ONNX Runtime): how many runs it takes a model to settle after the other's turn.
Writes bench/results/turns.json and .md with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ort_waiting import models

from edgeprune.environment import environment
from edgeprune.fsio import write_json, write_text
from edgeprune.measure import onnx_runner, openvino_available, time_interleaved, torch_runner
from edgeprune.recipe import LatencyOptions

RESULTS = Path(__file__).parent / "results" / "turns.json"
WAYS = {"single": {"turn_runs": 1, "settle_runs": 0}, "settled": {}, "alone": None}
POSITIONS = 12


def runner(runtime: str, path: Path, model, size, lat: LatencyOptions):
    if runtime == "torch_cpu":
        return torch_runner(model, size, lat.batch_size)
    return onnx_runner(runtime, path, size, lat)


def one_round(pairs: dict, runtimes: list[str], repeats: int) -> dict:
    """ms per (pair, runtime, way, label)."""
    ms = {}
    for p, pair in pairs.items():
        for rt in runtimes:
            base = LatencyOptions(repeats=repeats)
            runners = {label: runner(rt, pair["onnx"][label], pair["torch"][label], pair["size"], base)
                       for label in ("unpruned", "pruned")}
            for way, update in WAYS.items():
                if update is None:  # each alone: warm-ups then every run back to back
                    timed = {label: time_interleaved({label: fn}, base)[label] for label, fn in runners.items()}
                else:
                    timed = time_interleaved(runners, base.model_copy(update=update))
                ms.update({(p, rt, way, label): t.median_ms for label, t in timed.items()})
    return ms


def positions(pairs: dict, turns: int) -> dict:
    """ONNX Runtime: median ms at each position of a turn of POSITIONS back-to-back runs, models alternating."""
    out = {}
    lat = LatencyOptions()
    for p, pair in pairs.items():
        runners = {label: runner("ort_cpu", path, None, pair["size"], lat) for label, path in pair["onnx"].items()}
        times = {label: [[] for _ in range(POSITIONS)] for label in runners}
        time_interleaved(runners, lat.model_copy(update={"repeats": 1}))  # warm-up
        for _ in range(turns):
            for label, fn in runners.items():
                for i in range(POSITIONS):
                    t0 = time.perf_counter()
                    fn()
                    times[label][i].append(time.perf_counter() - t0)
        out[p] = {label: [round(statistics.median(t) * 1e3, 3) for t in times[label]] for label in times}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed runs of each model per way and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--position-turns", type=int, default=40)
    args = parser.parse_args()
    runtimes = ["torch_cpu", "ort_cpu"] + (["ov_cpu"] if openvino_available() else [])
    with tempfile.TemporaryDirectory(prefix="edgeprune-turns-") as tmp:
        pairs = models(Path(tmp))
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(pairs, runtimes, args.repeats))
            print(f"round {r + 1}: " + ", ".join(
                f"{p} {rt} {w}: {rounds[-1][(p, rt, w, 'unpruned')] / rounds[-1][(p, rt, w, 'pruned')]:.2f}x"
                for p in pairs for rt in runtimes for w in WAYS), flush=True)
        by_position = positions(pairs, args.position_turns)
    rows = []
    for p, pair in pairs.items():
        for rt in runtimes:
            for way in WAYS:
                def med(label, p=p, rt=rt, way=way):
                    return statistics.median(r[(p, rt, way, label)] for r in rounds)
                speedups = [r[(p, rt, way, "unpruned")] / r[(p, rt, way, "pruned")] for r in rounds]
                rows.append({"model": p, "runtime": rt, "way": way, "unpruned_ms": round(med("unpruned"), 3),
                             "pruned_ms": round(med("pruned"), 3), "speedup": round(statistics.median(speedups), 2),
                             "speedup_rounds": [round(x, 2) for x in speedups],
                             "of_macs_reduction": round(statistics.median(speedups) / pair["macs_reduction"], 3),
                             "macs_reduction": round(pair["macs_reduction"], 2)})
    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/turns.py", *sys.argv[1:]])
    lat = LatencyOptions()
    results = {"command": command, "environment": environment(), "repeats": args.repeats, "rounds": args.rounds,
               "turn_runs": lat.turn_runs, "settle_runs": lat.settle_runs, "warmup": lat.warmup, "rows": rows,
               "positions_ort_cpu": by_position}
    write_json(RESULTS, results)
    what = {"single": "single runs in turn", "settled": f"settled turns ({lat.settle_runs} untimed + "
            f"{lat.turn_runs} timed)", "alone": "each alone, back to back"}
    lines = ["# How models take turns when timed, and a pruned model's speed-up", "", f"`{command}`", "",
             f"{results['environment']['cpu']}, 2 threads, batch 1, {args.repeats} timed runs of each model per way "
             f"and round after {lat.warmup} warm-ups; ONNX Runtime with its workers' bounded spin "
             f"({lat.ort_spin_us} us). Medians over {args.rounds} rounds; the speed-up of each round in brackets.",
             "", "| model | runtime | timed | unpruned ms | pruned ms | speed-up | of the MACs reduction |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} ({r['macs_reduction']:.2f}x fewer MACs) | {r['runtime']} | {what[r['way']]} "
              f"| {r['unpruned_ms']:.3f} | {r['pruned_ms']:.3f} | {r['speedup']:.2f}x "
              f"({', '.join(f'{x:.2f}' for x in r['speedup_rounds'])}) | {r['of_macs_reduction']:.2f} |"
              for r in rows]
    lines += ["", f"ONNX Runtime, median ms at each position of a turn of {POSITIONS} back-to-back runs, the two "
              f"models alternating ({args.position_turns} turns each):", "",
              "| model | | " + " | ".join(str(i + 1) for i in range(POSITIONS)) + " |",
              "|---|---|" + "---:|" * POSITIONS]
    for p, labels in by_position.items():
        lines += [f"| {p} | {label} | " + " | ".join(f"{x:.2f}" for x in ms) + " |" for label, ms in labels.items()]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How ONNX Runtime's workers wait for work, and what it does to a pruned model's speed-up: asleep (edgeprune's
timing before 2026-12-01), a bounded spin of N microseconds (`latency.ort_spin_us`, `session.intra_op.spin_duration_us`;
20 by default now) and ONNX Runtime's own unbounded spin (`latency.ort_spinning`).

    EDGEPRUNE_HOME=../shared/data python bench/ort_waiting.py [--spin-us 0 10 20 50 100 500] [--turns 300] [--rounds 3]

Models: ResNet-50 (random init) and its `--ratio 0.7` prune with round_to 16, and the JPEG-adapted CIFAR ResNet-56
and its uniform prune to half the MACs (no rounding). Batch 1, 2 threads. In each round, every model and setting
but the unbounded spin runs in one round-robin (`--turns` single runs each, as `edgeprune` timed until
measure stage version 2), so that all
settings meet the same load; then the unbounded spin and the default bounded spin are timed together in settled
turns (each model's turn runs it untimed for 0.15 s, then times 10 runs: how `latency.ort_spinning` times, and how
a model runs when it is called back to back). Each figure is the median over the rounds of the per-round medians.
Writes bench/results/ort_waiting.json and .md with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from edgeprune import PruneOptions, create_model, prune
from edgeprune.distributed import seed_everything
from edgeprune.environment import environment
from edgeprune.export import export_onnx
from edgeprune.fsio import write_json, write_text
from edgeprune.measure import SPIN_BLOCK, count_macs, ort_runner, time_interleaved
from edgeprune.recipe import ExportOptions, LatencyOptions

RESULTS = Path(__file__).parent / "results" / "ort_waiting.json"
PAIRS = {"resnet50": ("resnet50", "none", {"ratio": 0.7, "round_to": 16}),
         "cifar_resnet56": ("cifar_resnet56", "cifar10-jpeg", {"macs_reduction": 0.5, "round_to": None})}


def models(folder: Path) -> dict[str, dict]:
    """Each pair's unpruned and pruned models and ONNX files, input size and MACs reduction."""
    import torch

    out = {}
    for name, (model_name, weights, target) in PAIRS.items():
        seed_everything(0)
        baseline = create_model(model_name, weights)
        size = baseline.edgeprune_spec.input_size
        pruned, _ = prune(baseline, PruneOptions(**target))
        example = torch.randn(1, *size)
        out[name] = {"size": size, "macs_reduction": count_macs(baseline, example) / count_macs(pruned, example),
                     "torch": {"unpruned": baseline.eval(), "pruned": pruned.eval()},
                     "onnx": {label: export_onnx(m, size, folder / f"{name}-{label}.onnx", ExportOptions())
                              for label, m in (("unpruned", baseline), ("pruned", pruned))}}
    return out


def one_round(pairs: dict[str, dict], spin_us: list[int], turns: int, default_us: int) -> dict:
    """ms per (pair, setting, model) for one round: the round-robin settings, then the settled ones."""
    plain = LatencyOptions(warmup=10, repeats=turns, turn_runs=1, settle_runs=0)  # single runs in turn
    runners = {(p, str(us), label): ort_runner(path, pairs[p]["size"], 1, plain.threads, spin_us=us)
               for p in pairs for us in spin_us for label, path in pairs[p]["onnx"].items()}
    timed = time_interleaved(dict(enumerate(runners.values())), plain)
    ms = {key: timed[i].median_ms for i, key in enumerate(runners)}
    settled = LatencyOptions(warmup=10, repeats=max(SPIN_BLOCK, turns // 10), settle_runs=0)
    for p in pairs:
        # the unbounded spin's runners make time_interleaved settle every turn, the bounded ones' too
        spun = {(p, setting, label): ort_runner(path, pairs[p]["size"], 1, settled.threads, spinning=setting == "spin",
                                                spin_us=default_us)
                for setting in ("spin", f"{default_us} settled") for label, path in pairs[p]["onnx"].items()}
        timed = time_interleaved(dict(enumerate(spun.values())), settled)
        ms.update({key: timed[i].median_ms for i, key in enumerate(spun)})
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin-us", type=int, nargs="+", default=[0, 10, 20, 50, 100, 500])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    default_us = LatencyOptions().ort_spin_us
    settings = [str(us) for us in args.spin_us] + ["spin", f"{default_us} settled"]
    with tempfile.TemporaryDirectory(prefix="edgeprune-ort-waiting-") as tmp:
        pairs = models(Path(tmp))
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(pairs, args.spin_us, args.turns, default_us))
            print(f"round {r + 1}: " + ", ".join(
                f"{p} {s}: {rounds[-1][(p, s, 'unpruned')] / rounds[-1][(p, s, 'pruned')]:.2f}x"
                for p in pairs for s in settings), flush=True)
    rows = []
    for p, pair in pairs.items():
        for s in settings:
            def med(label, p=p, s=s):
                return statistics.median(r[(p, s, label)] for r in rounds)
            speedups = [r[(p, s, "unpruned")] / r[(p, s, "pruned")] for r in rounds]
            rows.append({"model": p, "setting": s, "unpruned_ms": round(med("unpruned"), 3),
                         "pruned_ms": round(med("pruned"), 3), "speedup": round(statistics.median(speedups), 2),
                         "speedup_rounds": [round(x, 2) for x in speedups],
                         "of_macs_reduction": round(statistics.median(speedups) / pair["macs_reduction"], 3),
                         "macs_reduction": round(pair["macs_reduction"], 2)})
    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/ort_waiting.py", *sys.argv[1:]])
    results = {"command": command, "environment": environment(), "turns": args.turns, "rounds": args.rounds,
               "rows": rows}
    write_json(RESULTS, results)
    what = {"0": "asleep (0 us)", "spin": "unbounded spin, settled turns",
            f"{default_us} settled": f"{default_us} us, settled turns"}
    lines = ["# How ONNX Runtime's workers wait, and a pruned model's speed-up", "", f"`{command}`", "",
             f"{results['environment']['cpu']}, 2 threads, batch 1. Round-robin settings: {args.turns} single runs "
             f"of each model per round; settled turns: each model's turn runs it untimed for 0.15 s, then times 10 "
             f"runs. Medians over {args.rounds} rounds; the speed-up of each round in brackets.", "",
             "| model | workers wait | unpruned ms | pruned ms | speed-up | of the MACs reduction |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} ({r['macs_reduction']:.2f}x fewer MACs) "
              f"| {what.get(r['setting'], r['setting'] + ' us')} "
              f"| {r['unpruned_ms']:.3f} | {r['pruned_ms']:.3f} | {r['speedup']:.2f}x "
              f"({', '.join(f'{x:.2f}' for x in r['speedup_rounds'])}) | {r['of_macs_reduction']:.2f} |" for r in rows]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

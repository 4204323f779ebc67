"""The accuracy budget on the JPEG-adapted ResNet-56: the most pruned model whose recovered top-1 stays
within --max-drop points of the unpruned model's (`edgeprune prune --max-drop`).

    EDGEPRUNE_HOME=../shared/data python bench/max_drop.py [--max-drop 1.0] [--allocation sensitivity]
        [--epochs 1] [--trials 4] [--out DIR]

The built-in default recipe (l2 importance, BN re-calibration on 1,024 images, `--epochs` of distilled
fine-tuning per trial, full cifar10-jpeg test set, seed 0) with `prune.max_drop`, searched by MACs; every
trial is a full prune-and-recover run (see edgeprune.budget), the sensitivity analysis shared between
them. Channel counts are not rounded (prune.round_to none), as in bench/allocation.py's rows.
Writes bench/results/max_drop.json (one entry per allocation, epoch budget and max drop) and .md, with the
command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "max_drop.json"


def _save(results: dict) -> None:
    from edgeprune.fsio import write_json, write_text

    write_json(RESULTS, results)
    lines = ["# ResNet-56 (JPEG CIFAR-10): the most pruned model within an accuracy budget", ""]
    for s in results["searches"]:
        lines += [f"`{s['command']}`", "",
                  f"Allocation {s['allocation']}, {s['epochs']} epoch(s) of distilled fine-tuning per trial, "
                  f"budget {s['max_drop']:g} point{'' if s['max_drop'] == 1 else 's'} below the unpruned "
                  f"{s['baseline']:.2f}% (full test set); "
                  f"chosen: **{s['chosen']}**, {s['chosen_macs_factor']:.2f}x fewer MACs, "
                  f"{s['chosen_top1']:.2f}%; wall {s['wall_s']:.0f} s.", "",
                  "| trial | MACs removed (asked) | MACs factor | ORT ms | top-1 recovered | drop | within |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t in s["trials"]:
            lines.append(f"| {t['name']} | {t['fraction']:.3f} | "
                         f"{'' if not t['macs'] else format(s['baseline_macs'] / t['macs'], '.2f') + 'x'} | "
                         f"{'' if t['latency_ms'] is None else format(t['latency_ms'], '.2f')} | "
                         f"{'' if t['recovered'] is None else format(t['recovered'], '.2f')} | "
                         f"{'' if t['drop'] is None else format(t['drop'], '.2f')} | "
                         f"{'yes' if t['within'] else 'no'} |")
        lines.append("")
    lines += [f"Note: {n}" for n in results.get("notes", [])]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--allocation", choices=("uniform", "sensitivity", "global"), default="sensitivity")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of every trial")
    parser.add_argument("--trials", type=int, default=4, help="prune.max_drop_trials")
    parser.add_argument("--out", type=Path, default=None, help="the search's folder, resumable (default: temporary)")
    args = parser.parse_args()
    from edgeprune import load_recipe
    from edgeprune.budget import search
    from edgeprune.environment import environment

    recipe = load_recipe(None, {"prune.max_drop": args.max_drop, "prune.allocation": args.allocation,
                                "prune.max_drop_trials": args.trials, "prune.round_to": None,
                                "recover.epochs": args.epochs, "int8.enabled": False, "latency.per_layer": False})
    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/max_drop.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="edgeprune-maxdrop-bench-") as tmp:
        t0 = time.time()
        report = search(recipe, args.out or Path(tmp), quiet=False, resume=args.out is not None)
        wall = time.time() - t0
    budget = report["max_drop"]
    chosen = next(t for t in budget["trials"] if t["name"] == budget["chosen"])
    entry = {"allocation": args.allocation, "epochs": args.epochs, "max_drop": args.max_drop,
             "baseline": budget["baseline"], "baseline_macs": report["baseline"]["macs"],
             "chosen": budget["chosen"], "chosen_top1": chosen["recovered"],
             "chosen_macs_factor": round(report["baseline"]["macs"] / chosen["macs"], 3),
             "trials": budget["trials"], "wall_s": round(wall, 1), "command": command,
             "environment": environment()}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"searches": []}
    key = ("allocation", "epochs", "max_drop")
    results["searches"] = [s for s in results["searches"] if any(s[k] != entry[k] for k in key)] + [entry]
    _save(results)
    print(json.dumps({k: entry[k] for k in ("chosen", "chosen_top1", "chosen_macs_factor", "wall_s")}))


if __name__ == "__main__":
    main()

"""The MACs sweep of the JPEG-adapted CIFAR ResNet-56 behind bench/results/sweep-cifar_resnet56-macs.md.

    EDGEPRUNE_HOME=../shared/data python bench/sweep.py [--macs-reductions 0.2 0.35 0.5] [--repeats 50]

Through the public API (`edgeprune.sweep`), the same settings as
`edgeprune sweep --model cifar_resnet56 --weights cifar10-jpeg --data cifar10 --epochs 0
--macs-reductions 0.2,0.35,0.5 --set latency.repeats=50 --set latency.per_layer=false`: the default
recipe (BN re-calibration, INT8) with no fine-tuning. One resumable run folder per point under
--work (bench/work/, git-ignored); when every point is done the unpruned model, each point and their
INT8 models are timed side by side in one call. The result is copied to
bench/results/sweep-cifar_resnet56-macs.json and .md with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from edgeprune import load_recipe, sweep
from edgeprune.sweeps import markdown

RESULTS = Path(__file__).parent / "results"
NAME = "sweep-cifar_resnet56-macs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs-reductions", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model (median reported)")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs per point (0: BN re-calibration "
                        "only)")
    parser.add_argument("--work", default="bench/work/sweep-cifar_resnet56-macs",
                        help="sweep folder: one resumable run folder per point")
    parser.add_argument("--overwrite", action="store_true", help="discard different runs already in --work")
    args = parser.parse_args()
    command = ("python bench/sweep.py " + shlex.join(sys.argv[1:])).strip()
    recipe = load_recipe(None, {"model.name": "cifar_resnet56", "model.weights": "cifar10-jpeg",
                                "data.path": "cifar10", "recover.epochs": args.epochs, "prune.allocation": "uniform",
                                "latency.repeats": args.repeats, "latency.per_layer": False})
    result = sweep(recipe, "macs_reduction", args.macs_reductions, args.work, quiet=True, overwrite=args.overwrite)
    assert result is not None  # one process: the main one returns the sweep
    result["command"] = command  # sweep() records `edgeprune <argv>`, which is not what ran here
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()

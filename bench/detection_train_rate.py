"""How fast the pruned YOLOv8n fine-tunes in each training setting: FP32 (what detectors trained in before
recover.amp and recover.channels_last applied to them), FP32 channels-last (what CPUs with neither bf16 nor
AVX-512 now get), bf16 autocast, bf16 channels-last, and the shipped setting (bf16 channels-last with the packed
batch norm); the teacher folded (Ultralytics' own fuse()) or not.

    EDGEPRUNE_HOME=../shared/data python bench/detection_train_rate.py [--steps 6] [--rounds 3]

Every setting runs edgeprune's own detector fine-tuning (`detection.train.finetune`: Ultralytics' loss, mosaic
augmentation on the main process, EMA, distillation from the unpruned detector) for one epoch of `--steps` batches
of the shipped recipe (src/edgeprune/recipes/yolov8n-cifar10det.yaml: batch 32, 256x256) on the model that recipe
prunes. Each timed call follows an untimed one-batch call in the same setting (a warm-up: oneDNN's kernels for
these shapes are then built), and its rate is its epoch's own clock, so images per second include loading and
augmenting them. Every setting runs once per
round, in turns (each round starting one later), and each figure is the median over `--rounds` rounds: this
machine's speed drifts minute to minute. The accuracy of a full bf16 fine-tune is bench/detection.py's to measure.
Writes bench/results/detection_train_rate.json and .md with the command.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "detection_train_rate.json"
RECIPE = HERE.parent / "src" / "edgeprune" / "recipes" / "yolov8n-cifar10det.yaml"
# name -> recover overrides; fold_teacher stays off here: detectors' fine-tuning never folds its teacher, and the
# folded-teacher setting folds it by hand with Ultralytics' own fuse()
SETTINGS = {
    "fp32 contiguous": {"amp": False, "channels_last": False, "packed_batchnorm": False},
    "fp32 channels-last": {"amp": False, "channels_last": True, "packed_batchnorm": False},
    "bf16 contiguous": {"amp": True, "channels_last": False, "packed_batchnorm": False},
    "bf16 channels-last": {"amp": True, "channels_last": True, "packed_batchnorm": False},
    "bf16 channels-last, teacher folded": {"amp": True, "channels_last": True, "packed_batchnorm": False},
    "shipped: bf16 channels-last, packed batch norm": {"amp": True, "channels_last": True, "packed_batchnorm": True},
    "shipped, teacher folded": {"amp": True, "channels_last": True, "packed_batchnorm": True},
}


def _markdown(results: dict) -> str:
    base = results["settings"]["fp32 contiguous"]["images_per_s"]
    lines = ["# Fine-tuning rate of the pruned YOLOv8n per training setting", "", f"`{results['command']}`", "",
             f"{results['environment']['cpu']}, {results['threads']} threads, batch {results['batch_size']} at "
             f"{results['imgsz']}x{results['imgsz']}, {results['steps']} batches per timed call (after a one-batch "
             "warm-up call), "
             f"{results['rounds']} rounds in turns, medians. MACs per image: unpruned "
             f"{results['macs']['unpruned']:.3g}, pruned {results['macs']['pruned']:.3g}. Images per second include "
             "mosaic loading on the main process.",
             "", "| setting | images/s | vs fp32 contiguous | rounds | packed BatchNorm layers |",
             "|---|---:|---:|---|---:|"]
    for name, s in results["settings"].items():
        rounds = ", ".join(f"{r:.1f}" for r in s["rounds"])
        lines.append(f"| {name} | {s['images_per_s']:.1f} | {s['images_per_s'] / base:.2f}x | {rounds} | "
                     f"{s['packed_batchnorms']} |")
    lines += ["", *[f"Note: {n}" for n in results.get("notes", [])]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="batches per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from edgeprune import create_model, load_recipe, prune
    from edgeprune.detection.data import load_detection_data
    from edgeprune.detection.train import finetune
    from edgeprune.environment import environment
    from edgeprune.fsio import read_json, write_json, write_text
    from edgeprune.measure import count_macs, torch_threads

    recipe = load_recipe(RECIPE)
    teacher = create_model(**recipe.model.model_dump())
    data = load_detection_data(recipe.data.path)
    pruned, _ = prune(copy.deepcopy(teacher), recipe.prune)
    folded = copy.deepcopy(teacher).fuse(verbose=False)
    example = teacher.edgeprune_spec.example_input()
    base = recipe.recover.model_copy(update={"epochs": 1, "train_images": args.steps * recipe.recover.batch_size,
                                             "close_mosaic": 0, "eval_every_epoch": False})
    names = list(SETTINGS)
    rates: dict[str, list[float]] = {n: [] for n in names}
    packed: dict[str, int] = {}
    with torch_threads(recipe.latency.threads):
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                student = copy.deepcopy(pruned)  # every call starts from the same weights
                opts = base.model_copy(update=SETTINGS[name])
                warm = base.model_copy(update={**SETTINGS[name], "train_images": recipe.recover.batch_size})
                t = folded if "folded" in name else teacher
                finetune(copy.deepcopy(pruned), t, data, warm, seed=recipe.seed)  # warm-up, untimed
                t0 = time.time()
                result = finetune(student, t, data, opts, seed=recipe.seed)
                wall = time.time() - t0
                rates[name].append(args.steps * recipe.recover.batch_size / result.epochs[0].seconds)
                packed[name] = result.packed_batchnorms
                print(f"round {r + 1} {name}: {rates[name][-1]:.1f} img/s ({wall:.0f} s)", file=sys.stderr, flush=True)
    results = {
        "command": "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/detection_train_rate.py",
                                                                         *sys.argv[1:]]),
        "environment": environment(), "threads": recipe.latency.threads, "batch_size": recipe.recover.batch_size,
        "imgsz": example.shape[-1], "steps": args.steps, "rounds": args.rounds,
        "macs": {"unpruned": count_macs(teacher, example), "pruned": count_macs(pruned, example)},
        "settings": {n: {"images_per_s": statistics.median(rates[n]), "rounds": rates[n], "overrides": SETTINGS[n],
                         "teacher": "folded (Ultralytics fuse())" if "folded" in n else "as trained",
                         "packed_batchnorms": packed[n]} for n in names},
    }
    if RESULTS.exists():  # notes on earlier runs stay
        results["notes"] = read_json(RESULTS).get("notes", [])
    write_json(RESULTS, results)
    write_text(RESULTS.with_suffix(".md"), _markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()

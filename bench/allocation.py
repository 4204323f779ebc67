"""How the channels are spread: uniform against sensitivity allocation on the JPEG-adapted ResNet-56.

    EDGEPRUNE_HOME=../shared/data python bench/allocation.py [--variants uniform-2x sensitivity-2x uniform-3x
        sensitivity-3x sensitivity-2x-s3 ...] [--epochs 5] [--out DIR]
    EDGEPRUNE_HOME=../shared/data python bench/allocation.py --variants uniform-ms sensitivity-ms --target-ms 2.8
    EDGEPRUNE_HOME=../shared/data python bench/allocation.py --train-rate 1280 [--rounds 5]

Every variant is the built-in default recipe (src/edgeprune/recipes/default.yaml: l2 importance, BN
re-calibration on 1,024 images, distillation) at a MACs target (2x: macs_reduction 0.5, 3x: 0.667), or at
the latency target --target-ms on ONNX Runtime (FACTOR ms; sensitivity then allocates milliseconds), with
`--epochs` of fine-tuning (a suffix -sN: pruned in N steps, the epochs shared between them), evaluated on
the full cifar10-jpeg test set (10,000 images), same seed; every variant asks for its allocation, whatever
the default recipe's. The sensitivity analysis (the recipe's settings: every group alone at 0.25/0.5/0.75,
256 held-out training images or with --sensitivity-split eval 256 test images, BN re-calibrated on 128;
until 2026-11-30 0.2/0.4/0.6/0.8, 500 and 256) runs once and is shared by the
sensitivity variants (or reused from OUT/sensitivity when --out names a folder holding one); its own time
is added to their wall time.
Each variant is appended to bench/results/allocation.json (and .md) when it finishes, with the command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "allocation.json"
TARGETS = {"2x": 0.5, "3x": 2 / 3}  # MACs removed; FACTOR "ms": --target-ms on ONNX Runtime


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"variants": []}


def _save(results: dict) -> None:
    from edgeprune.fsio import write_json, write_text

    write_json(RESULTS, results)
    lines = ["# ResNet-56 (JPEG CIFAR-10): uniform against sensitivity allocation", "",
             *dict.fromkeys(f"`{v['command']}`" for v in results["variants"]), "",
             "| variant | allocation (analysed on) | steps | MACs factor | epochs | top-1 baseline | after BN re-cal | "
             "fine-tuned | drop | predicted distortion (KL, summed) | ORT speed-up | pruned ORT ms (target) | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in results["variants"]:
        t = v["top1"]
        drop = "" if t.get("finetuned") is None else f"{t['baseline'] - t['finetuned']:.2f}"
        predicted = "" if v.get("predicted_distortion") is None else f"{v['predicted_distortion']:.4f}"
        split = f" ({v['sensitivity_split']})" if v.get("sensitivity_split") else ""
        lines.append(f"| {v['name']} | {v['allocation']}{split} | {v['steps']} | {v['macs_factor']:.2f} | "
                     f"{v['epochs']} | "
                     f"{t['baseline']:.2f} | {t['recalibrated']:.2f} | "
                     f"{'' if t.get('finetuned') is None else format(t['finetuned'], '.2f')} | {drop} | {predicted} | "
                     f"{'' if v.get('ort_speedup') is None else format(v['ort_speedup'], '.2f') + 'x'} | "
                     f"{'' if v.get('pruned_ort_ms') is None else format(v['pruned_ort_ms'], '.2f')}"
                     f"{'' if v.get('target_ms') is None else ' (' + format(v['target_ms'], 'g') + ')'} | "
                     f"{v['wall_s']:.0f} |")
    if rate := results.get("train_rate"):
        lines += ["", _rate_line(rate)]
    for other in results.get("train_rate_other_cpus", {}).values():
        lines += ["", "Earlier, on another CPU: " + _rate_line(other)]
    lines += ["", *[f"Note: {n}" for n in results.get("notes", [])]]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def _cpu(rate: dict) -> str:
    """The CPU a rate was measured on: its name and the features that decide training speed."""
    return rate["cpu"] + (f" ({rate['cpu_features']})" if rate.get("cpu_features") else "")


def _within(rounds: list[float]) -> str:
    """A ratio taken in each round: its median and range."""
    return f"{statistics.median(rounds):.2f}x, rounds {min(rounds):.2f}-{max(rounds):.2f}"


def _rate_line(rate: dict) -> str:
    """The fine-tuning speed paragraph of allocation.md, from `train_rates`'s result."""
    r, precision = rate["img_per_s"], rate["precision"]

    def ce(key: str) -> str:
        return _within(rate["pruned_ce_vs_unpruned_ce_rounds"][key])

    def fold(key: str) -> str:
        return _within(rate["folded_vs_unfolded_rounds"][key])

    def pack(key: str) -> str:
        return _within(rate["packed_vs_unpacked_rounds"][key])
    t, f = rate["teacher_forward"], rate["teacher_fidelity"]
    return (f"Fine-tuning speed (`{rate['command']}`; recover.finetune, batch 128, {rate['images']} images per "
            f"timing, {rate['threads']} threads on {_cpu(rate)}, median of {len(rate['rounds']['pruned_ce'])} "
            "rounds, every setting once per round in turn, the ratios taken within each round): "
            f"channels-last in {precision} (recover.amp untimed: bf16 where the CPU has it): unpruned CE "
            f"{r['unpruned_ce']:.0f} img/s, pruned "
            f"({rate['macs_factor']:.2f}x fewer MACs) CE {r['pruned_ce']:.0f} ({ce('')}), pruned with distillation "
            f"{r['pruned_kd']:.0f}; in FP32 {r['unpruned_ce_fp32']:.0f}, {r['pruned_ce_fp32']:.0f} ({ce('_fp32')}) "
            f"and {r['pruned_kd_fp32']:.0f}; in FP32 in the contiguous layout {r['unpruned_ce_contiguous']:.0f}, "
            f"{r['pruned_ce_contiguous']:.0f} ({ce('_contiguous')}) and {r['pruned_kd_contiguous']:.0f}. "
            f"Distilling from the teacher as given (recover.fold_teacher false): {r['pruned_kd_unfolded']:.0f} "
            f"img/s, {r['pruned_kd_fp32_unfolded']:.0f} in FP32 (folded against as given: {fold('')} in "
            f"{precision}, {fold('_fp32')} in FP32). The pruned model in CE with PyTorch's own batch norm on its "
            f"layers whose width is not a multiple of 16 (recover.packed_batchnorm false): "
            f"{r['pruned_ce_unpacked']:.0f} img/s, {r['pruned_ce_fp32_unpacked']:.0f} in FP32 (packed against "
            f"PyTorch's: {pack('')} in {precision}, {pack('_fp32')} in FP32). "
            f"{_compiled_line(rate)}"
            f"{_batching_line(rate)}"
            f"The augmented data loader alone: {r['data_loader']:.0f} img/s"
            f"{_per_image_loader(r)}. "
            f"The teacher's forward alone (batch 128, channels-last, {t['runs']} runs of each timed in turns): "
            f"{t['img_per_s']['unfolded']:.0f} img/s in {precision}, {t['img_per_s']['unfolded_fp32']:.0f} in FP32; "
            f"folded {t['img_per_s']['folded']:.0f} and {t['img_per_s']['folded_fp32']:.0f}. Its soft targets (T=4) "
            f"on {f['images']} augmented training images, KL from the FP32 teacher's: {f['kl']['unfolded']:.2e} in "
            f"{precision} as given, {f['kl']['folded']:.2e} folded (folded in FP32: logits within "
            f"{f['folded_fp32_max_abs']:.1e}); "
            f"top-1 {f['top1']['fp32']:.2f}% in FP32, {f['top1']['unfolded']:.2f}% and {f['top1']['folded']:.2f}%.")


def _batching_line(rate: dict) -> str:
    """The sentence on augmenting a batch at once (rates measured before 2026-12-02 have none)."""
    if "batched_vs_per_image_rounds" not in rate:
        return ""
    r, b = rate["img_per_s"], rate["batched_vs_per_image_rounds"]
    return (f"With the training images augmented image by image (the DataLoader's fetch before 2026-12-02), in "
            f"FP32: unpruned CE {r['unpruned_ce_fp32_per_image']:.0f} img/s, pruned CE "
            f"{r['pruned_ce_fp32_per_image']:.0f} (batched against image by image: unpruned "
            f"{_within(b['unpruned_ce'])}, pruned {_within(b['pruned_ce'])}). ")


def _per_image_loader(r: dict) -> str:
    return "" if "data_loader_per_image" not in r else f", {r['data_loader_per_image']:.0f} image by image"


def _compiled_line(rate: dict) -> str:
    """The compiled settings' sentences of the speed paragraph (rates measured before 2026-12-02 have none)."""
    if "compiled_vs_eager_rounds" not in rate:
        return ""
    r, precision = rate["img_per_s"], rate["precision"]
    ce, comp = rate["pruned_ce_vs_unpruned_ce_rounds"], rate["compiled_vs_eager_rounds"]
    return (f"Compiled (recover.compile true, torch.compile): in {precision} unpruned CE "
            f"{r['unpruned_ce_compiled']:.0f} img/s, pruned CE {r['pruned_ce_compiled']:.0f} "
            f"({_within(ce['_compiled'])}), pruned with distillation {r['pruned_kd_compiled']:.0f}; in FP32 "
            f"{r['unpruned_ce_fp32_compiled']:.0f}, "
            f"{r['pruned_ce_fp32_compiled']:.0f} ({_within(ce['_fp32_compiled'])}) and "
            f"{r['pruned_kd_fp32_compiled']:.0f} (compiled against eager: unpruned CE "
            f"{_within(comp['unpruned_ce'])}, "
            f"pruned CE {_within(comp['pruned_ce'])}, distilling {_within(comp['pruned_kd'])} in {precision}; "
            f"{_within(comp['unpruned_ce_fp32'])}, {_within(comp['pruned_ce_fp32'])} and "
            f"{_within(comp['pruned_kd_fp32'])} in FP32). ")


# Fine-tuning settings the rate bench (and bench/train_profile.py) time: recover.amp on, untimed at 1280 images (bf16
# autocast on CPUs with bf16; a recipe's fine-tune of 100 steps or more keeps the faster of it and FP32), in FP32
# (recover.amp false; the default before 2026-11-30), and in FP32 in the contiguous layout (recover.channels_last
# false too; before 2026-11-29)
RATE_SETTINGS = {"": {}, "_fp32": {"amp": False}, "_contiguous": {"amp": False, "channels_last": False}}
# ... and both channels-last settings compiled (recover.compile true: the training step through torch.compile, which
# recover.compile auto does for a fine-tune of 1000 steps or more where it times faster; since 2026-12-02)
COMPILED_SETTINGS = {"_compiled": {"compile": True}, "_fp32_compiled": {"amp": False, "compile": True}}


def rate_models():
    """The rate bench's recipe, unpruned ResNet-56, its 2x-pruned version (uniform, macs_reduction 0.5, no rounding:
    as timed before round_to auto) and the training set."""
    from edgeprune import create_model, load_recipe, prune
    from edgeprune.data import load_split

    recipe = load_recipe(None, {"prune.macs_reduction": 0.5, "prune.allocation": "uniform", "prune.round_to": None})
    model = create_model(**recipe.model.model_dump())
    pruned, _ = prune(model, recipe.prune)
    return recipe, model, pruned, load_split(recipe.data.path, model.edgeprune_spec, True)


def train_rates(images: int, rounds: int = 5) -> dict:
    """Images per second of edgeprune's fine-tuning (recover.finetune, batch 128, the default recipe's SGD):
    the unpruned ResNet-56 and the 2x-pruned one (uniform, macs_reduction 0.5) in plain cross-entropy, and the
    pruned one distilling from the unpruned (its BatchNorm layers folded, and as given), in each precision and
    layout; the pruned one in CE with PyTorch's own batch norm (recover.packed_batchnorm false); and the teacher
    alone (`_teacher_checks`); and the three runs compiled (recover.compile true) in both channels-last settings,
    each compiling before its timing starts. Every setting runs `images` images per round, all settings in turn
    within a round (each round starting one setting later), `rounds` rounds: load on a shared machine moves a
    round's settings together, so the ratios (pruned/unpruned, folded/unfolded, packed/unpacked, compiled/eager)
    are taken within each round and their medians reported, beside each setting's median rate."""
    import copy

    import torch
    from tqdm import tqdm

    from edgeprune.data import loader
    from edgeprune.distributed import runtime
    from edgeprune.environment import environment
    from edgeprune.measure import count_macs
    from edgeprune.recover import finetune

    recipe, model, pruned, train = rate_models()
    example = model.edgeprune_spec.example_input()
    models = {"unpruned_ce": (model, None), "pruned_ce": (pruned, None), "pruned_kd": (pruned, model)}
    settings = RATE_SETTINGS | COMPILED_SETTINGS
    runs = {f"{k}{suffix}": (*m, setting, train) for suffix, setting in settings.items() for k, m in models.items()}
    # distilling from the teacher as given, its BatchNorm layers not folded (recover.fold_teacher false; the
    # default before 2026-12-01)
    runs |= {f"pruned_kd{suffix}_unfolded": (pruned, model, {**settings[suffix], "fold_teacher": False}, train)
             for suffix in ("", "_fp32")}
    # the pruned model trained with PyTorch's own batch norm on its layers whose width is not a multiple of 16
    # (recover.packed_batchnorm false; before 2026-12-01 they ran contiguous, with copies there and back)
    runs |= {f"pruned_ce{suffix}_unpacked": (pruned, None, {**settings[suffix], "packed_batchnorm": False}, train)
             for suffix in ("", "_fp32")}
    # both models in CE in FP32 with the training images augmented one by one by torchvision's transforms (the
    # DataLoader's fetch before 2026-12-02; data.SmallImageTransform now augments a batch at once, the same draws)
    per_image = _per_image(train)
    runs |= {f"{k}_fp32_per_image": (m, None, settings["_fp32"], per_image)
             for k, m in (("unpruned_ce", model), ("pruned_ce", pruned))}
    opts = recipe.recover.model_copy(update={"epochs": 1, "train_images": images})
    precision = finetune(copy.deepcopy(pruned), None, train, None, opts.model_copy(update={"train_images": 256}),
                         runtime()).precision  # also a warm-up
    rates: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for i in tqdm(range(rounds), desc="rounds"):
        for key in order[i % len(order):] + order[:i % len(order)]:  # each round starts one setting later
            student, teacher, setting, dataset = runs[key]
            result = finetune(copy.deepcopy(student), teacher, dataset, None,
                              opts.model_copy(update={"distill": teacher is not None, **setting}), runtime())
            assert teacher is None or (result.teacher_folded_batchnorms > 0) == setting.get("fold_teacher", True)
            rates[key].append(round(images / result.epochs[0].seconds, 1))
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}

    def per_round(a: str, b: str) -> list[float]:
        return [round(x / y, 3) for x, y in zip(rates[a], rates[b], strict=True)]
    ratios = {suffix: per_round(f"pruned_ce{suffix}", f"unpruned_ce{suffix}") for suffix in settings}
    folding = {suffix: per_round(f"pruned_kd{suffix}", f"pruned_kd{suffix}_unfolded") for suffix in ("", "_fp32")}
    packing = {suffix: per_round(f"pruned_ce{suffix}", f"pruned_ce{suffix}_unpacked") for suffix in ("", "_fp32")}
    compiling = {f"{m}{suffix}": per_round(f"{m}{suffix}_compiled", f"{m}{suffix}")
                 for m in ("unpruned_ce", "pruned_ce", "pruned_kd") for suffix in ("", "_fp32")}
    batching = {k: per_round(f"{k}_fp32", f"{k}_fp32_per_image") for k in ("unpruned_ce", "pruned_ce")}
    # the augmented batches alone, batched and image by image, in turns
    loading: dict[str, list[float]] = {"data_loader": [], "data_loader_per_image": []}
    for _ in range(3):
        for key, ds in (("data_loader", train), ("data_loader_per_image", per_image)):
            t0, seen = time.perf_counter(), 0
            for _, y in loader(ds, opts.batch_size, shuffle=True, limit=images):
                seen += len(y)
            loading[key].append(seen / (time.perf_counter() - t0))
    median |= {k: round(statistics.median(v), 1) for k, v in loading.items()}
    env = environment()
    return {"images": images, "threads": torch.get_num_threads(), "cpu": env["cpu"],
            **_teacher_checks(model, train, precision, opts.batch_size, images),
            "cpu_features": env.get("cpu_features"), "precision": precision, "rounds": rates,
            "img_per_s": median,
            "pruned_ce_vs_unpruned_ce_rounds": ratios,
            **{f"pruned_ce_vs_unpruned_ce{suffix}": statistics.median(r) for suffix, r in ratios.items()},
            "folded_vs_unfolded_rounds": folding,
            "folded_vs_unfolded": {k: statistics.median(r) for k, r in folding.items()},
            "packed_vs_unpacked_rounds": packing,
            "packed_vs_unpacked": {k: statistics.median(r) for k, r in packing.items()},
            "compiled_vs_eager_rounds": compiling,
            "compiled_vs_eager": {k: statistics.median(r) for k, r in compiling.items()},
            "batched_vs_per_image_rounds": batching,
            "batched_vs_per_image": {k: statistics.median(r) for k, r in batching.items()},
            "macs_factor": round(count_macs(model, example) / count_macs(pruned, example), 3)}


def _per_image(train):
    """`train`'s images with torchvision's CIFAR augmentation as one Compose, which DecodedImages applies image by
    image."""
    from torchvision.transforms import v2 as T

    from edgeprune.data import DecodedImages
    t = train.transform
    return DecodedImages(train.images, train.targets, train.classes, T.Compose([t.crop, t.flip, t.tail]))


def _teacher_checks(model, train, precision: str, batch_size: int, images: int) -> dict:
    """The distillation teacher (channels-last, as fine-tuning runs it), folded (recover.fold_batchnorms) and as
    given: its forward alone at `batch_size`, FP32 and in `precision`, the four timed in turns
    (measure.time_interleaved); and how far its soft targets (T=4) move from the FP32 teacher's on `images`
    augmented training images."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from edgeprune.accuracy import channels_last_copy
    from edgeprune.data import loader
    from edgeprune.measure import time_interleaved
    from edgeprune.recipe import LatencyOptions
    from edgeprune.recover import fold_batchnorms

    x, y = map(torch.cat, zip(*loader(train, batch_size, shuffle=True, limit=images), strict=True))
    x = x.contiguous(memory_format=torch.channels_last)
    unfolded = channels_last_copy(model, x[:1])
    folded, count = fold_batchnorms(unfolded, x[:1], torch.channels_last)
    assert count, "the teacher's BatchNorm layers did not fold"
    low = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    settings = {"unfolded": (unfolded, low), "unfolded_fp32": (unfolded, contextlib.nullcontext),
                "folded": (folded, low), "folded_fp32": (folded, contextlib.nullcontext)}

    def logits(m, ctx) -> torch.Tensor:
        with torch.no_grad(), ctx():
            return torch.cat([m(b).float() for b in x.split(batch_size)])
    reference = logits(unfolded, contextlib.nullcontext)
    outputs = {k: logits(*v) for k, v in settings.items()}
    kl = {k: F.kl_div(F.log_softmax(outputs[k] / 4, 1), F.softmax(reference / 4, 1), reduction="batchmean").item()
          for k in ("unfolded", "folded")}
    top1 = {"fp32": (reference.argmax(1) == y).float().mean().item() * 100,
            **{k: (v.argmax(1) == y).float().mean().item() * 100 for k, v in outputs.items()
               if k in ("unfolded", "folded")}}
    batch = x[:batch_size]

    def runner(m, ctx):
        def run():
            with torch.no_grad(), ctx():
                m(batch)
        return run
    repeats = max(1, images // batch_size)
    timed = time_interleaved({k: runner(*v) for k, v in settings.items()},
                             LatencyOptions(threads=torch.get_num_threads(), warmup=1, repeats=repeats))
    return {"teacher_forward": {"runs": repeats, "img_per_s": {k: round(batch_size / t.median_ms * 1e3, 1)
                                                               for k, t in timed.items()}},
            "teacher_fidelity": {"images": len(y), "kl": kl, "top1": {k: round(v, 2) for k, v in top1.items()},
                                 "folded_fp32_max_abs": (outputs["folded_fp32"] - reference).abs().max().item()}}


def _variant(name: str) -> tuple[str, str, int]:
    """ALLOCATION-FACTOR[-sSTEPS] -> (allocation, factor, steps)."""
    allocation, _, rest = name.partition("-")
    factor, _, steps = rest.partition("-s")
    return allocation, factor, int(steps) if steps.isdigit() else (1 if not steps else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["uniform-2x", "sensitivity-2x", "uniform-3x",
                                                         "sensitivity-3x"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--target-ms", type=float, default=None, help="variants ALLOCATION-ms: the latency target")
    parser.add_argument("--sensitivity-split", choices=("train", "eval"), default="train",
                        help="the images the sensitivity analysis scores on (prune.sensitivity_split)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--train-rate", type=int, default=None, metavar="IMAGES", help="only time fine-tuning "
                        "(unpruned and pruned in CE, pruned with distillation) on this many images per round")
    parser.add_argument("--rounds", type=int, default=5, help="--train-rate: rounds, every setting once in each")
    args = parser.parse_args()
    if args.train_rate:
        results = _load()
        command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/allocation.py", *sys.argv[1:]])
        rate = {**train_rates(args.train_rate, args.rounds), "command": command}
        if (old := results.get("train_rate")) and _cpu(old) != _cpu(rate):  # keep the last one of each CPU
            results.setdefault("train_rate_other_cpus", {})[_cpu(old)] = old
        results.get("train_rate_other_cpus", {}).pop(_cpu(rate), None)
        results["train_rate"] = rate
        _save(results)
        print(json.dumps(results["train_rate"]))
        return
    for name in args.variants:
        allocation, factor, steps = _variant(name)
        if allocation not in ("uniform", "sensitivity", "global") or factor not in (*TARGETS, "ms") or steps < 1:
            parser.error(f"unknown variant {name!r}: ALLOCATION-FACTOR[-sSTEPS] with FACTOR in {[*TARGETS, 'ms']}")
        if factor == "ms" and not args.target_ms:
            parser.error(f"{name}: give --target-ms")
    from edgeprune import load_recipe, run
    from edgeprune.environment import environment
    from edgeprune.pipeline import sensitivity_run, share_sensitivity

    results = _load()
    command = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/allocation.py", *sys.argv[1:]])
    results["environment"] = environment()
    sens_folder, sens_seconds = None, 0.0
    with tempfile.TemporaryDirectory(prefix="edgeprune-alloc-bench-") as tmp:
        out = args.out or Path(tmp)
        for name in args.variants:
            allocation, factor, steps = _variant(name)
            target = ({"prune.target_latency_ms": args.target_ms} if factor == "ms" else
                      {"prune.macs_reduction": TARGETS[factor]})
            recipe = load_recipe(None, {**target, "prune.allocation": allocation,
                                        "prune.steps": steps, "recover.epochs": args.epochs, "int8.enabled": False,
                                        "prune.sensitivity_split": args.sensitivity_split,
                                        "latency.per_layer": False,
                                        "prune.round_to": None})  # allocation alone: sensitivity does not round
            folder = out / name
            shutil.rmtree(folder, ignore_errors=True)
            if allocation == "sensitivity":
                if sens_folder is None:  # an analysis already in OUT/sensitivity is reused (its stage fingerprint)
                    sens_folder = out / "sensitivity"
                    sensitivity_run(recipe, sens_folder, quiet=True)
                    sens_seconds = json.loads((sens_folder / "sensitivity.json").read_text())["seconds"]
                share_sensitivity(sens_folder, folder)
            t0 = time.time()
            report = run(recipe, folder, quiet=True)
            wall = time.time() - t0 + (sens_seconds if allocation == "sensitivity" else 0.0)
            row = {"name": name, "allocation": allocation, "steps": steps,
                   "macs_factor": round(report["baseline"]["macs"] / report["pruned"]["macs"], 3),
                   "epochs": args.epochs, "wall_s": round(wall, 1),
                   "sensitivity_s": round(sens_seconds, 1) if allocation == "sensitivity" else None,
                   "sensitivity_split": recipe.prune.sensitivity_split if allocation == "sensitivity" else None,
                   "target_ms": args.target_ms if factor == "ms" else None,
                   "pruned_ort_ms": report["pruned"]["latency_ms"].get("ort_cpu"),
                   "predicted_distortion": report["prune"].get("predicted_distortion"),
                   "group_ratios": report["prune"].get("group_ratios"),
                   "top1": {"baseline": report["baseline"]["top1"], "pruned": report["pruned"]["top1"],
                            "recalibrated": report["recalibrated"]["top1"],
                            "finetuned": report.get("finetuned", {}).get("top1")},
                   "ort_speedup": report["speedup"].get("ort_cpu"), "command": command}
            results["variants"] = [v for v in results["variants"]  # a variant's row per epoch budget
                                   if (v["name"], v["epochs"]) != (name, args.epochs)] + [row]
            _save(results)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

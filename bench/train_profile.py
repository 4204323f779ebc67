"""Where a fine-tuning step's time goes: the unpruned ResNet-56 against the 2x-pruned one, per kind of operator and
per convolution shape.

    EDGEPRUNE_HOME=../shared/data python bench/train_profile.py [--steps 4] [--rounds 3] [--model RUN/model.safetensors]

Each model runs edgeprune's own fine-tuning (`recover.finetune`, plain cross-entropy, batch 128, the default
recipe's SGD, augmentation on the main process) on `--steps` batches under torch.profiler, after a warm-up call, in
each setting: recover.amp untimed (bf16 autocast where the CPU has bf16, channels-last), FP32 channels-last and
FP32 contiguous. Every model and setting runs once per round (each round starting one later), `--rounds` rounds, and
each figure is the median over the rounds. The pruned model is the rate bench's (uniform allocation, macs_reduction
0.5, no rounding: `bench/allocation.py --train-rate`); `--model` adds a pruned artifact of your own (the default
run's model.safetensors, say). Self CPU time is summed per kind of operator (everything inside a batch norm,
PyTorch's or edgeprune's packed one, counts as batch norm); what the operators do not account for (loading and
augmenting images, Python) is the wall time left over. Convolutions are also summed per shape (input channels,
output channels, kernel, spatial size), forward and backward together. The profiler adds overhead, and this
machine's speed drifts: the rate bench, timed in turns, is where the speed-up is measured; this says where it goes.
Writes bench/results/train_profile.json and .md with the command.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_profile.json"
KINDS = ("convolution forward", "convolution backward", "batch norm forward", "batch norm backward",
         "elementwise and optimizer", "layout and precision copies", "other operators")


def kind(event) -> str:
    """The kind of a profiler event: batch norm when it runs inside one (PyTorch's, or edgeprune's packed batch
    norm, whose forward is recorded as `edgeprune::packed_batch_norm` and whose backward is an autograd node),
    else by its operator's name."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    if any("BatchNormBackward" in n or "batch_norm_backward" in n for n in names):
        return "batch norm backward"
    if any("batch_norm" in n for n in names):
        return "batch norm forward"
    return _kind(names[0])


def _kind(name: str) -> str:
    if "convolution_backward" in name:
        return "convolution backward"
    if "conv" in name:
        return "convolution forward"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::clone"):
        return "layout and precision copies"
    if any(op in name for op in ("add", "mul", "clamp", "threshold", "relu", "div", "sub", "Optimizer", "_foreach",
                                 "lerp", "sqrt")):
        return "elementwise and optimizer"
    return "other operators"


def conv_key(event) -> str | None:
    """'IN->OUT kxk @HxW' of a convolution event from its recorded input shapes, else None."""
    shapes = event.input_shapes
    if event.name in ("aten::mkldnn_convolution", "aten::_convolution"):
        x, w = shapes[0], shapes[1]
    elif event.name == "aten::convolution_backward":
        x, w = shapes[1], shapes[2]
    else:
        return None
    if len(x) != 4 or len(w) != 4:
        return None
    return f"{w[1]}->{w[0]} {w[2]}x{w[3]} @{x[2]}x{x[3]}"


def profile_finetune(model, train, opts, steps: int) -> dict:
    """Profile recover.finetune on `steps` batches of `model` (a copy), after a warm-up call on 2 batches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from edgeprune.distributed import runtime
    from edgeprune.recover import finetune

    finetune(copy.deepcopy(model), None, train, None, opts.model_copy(update={"train_images": 2 * opts.batch_size}),
             runtime())
    student = copy.deepcopy(model)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        result = finetune(student, None, train, None,
                          opts.model_copy(update={"train_images": steps * opts.batch_size}), runtime())
        wall = time.perf_counter() - t0
    ms: dict[str, float] = defaultdict(float)
    convs: dict[str, float] = defaultdict(float)
    for event in prof.events():
        self_ms = event.self_cpu_time_total / 1e3
        ms[kind(event)] += self_ms
        if (key := conv_key(event)) is not None:
            convs[key] += self_ms
    ms["outside operators (data, Python)"] = max(0.0, wall * 1e3 - sum(ms.values()))
    return {"precision": result.precision, "channels_last": result.channels_last,
            "packed_batchnorms": result.packed_batchnorms, "threads": torch.get_num_threads(),
            "ms_per_step": round(wall * 1e3 / steps, 1),
            "kinds": {k: round(v / steps, 2) for k, v in ms.items()},
            "convolutions": {k: round(v / steps, 2) for k, v in sorted(convs.items(), key=lambda kv: -kv[1])}}


def _median(profiles: list[dict]) -> dict:
    """One profile from several rounds': each figure's median (a kind or shape missing from a round counts 0)."""
    def median(key: str) -> dict:
        names = dict.fromkeys(k for p in profiles for k in p[key])
        return {k: round(statistics.median(p[key].get(k, 0.0) for p in profiles), 2) for k in names}
    convs = median("convolutions")
    return {**profiles[0], "ms_per_step": statistics.median(p["ms_per_step"] for p in profiles),
            "ms_per_step_rounds": [p["ms_per_step"] for p in profiles], "kinds": median("kinds"),
            "convolutions": dict(sorted(convs.items(), key=lambda kv: -kv[1]))}


def _markdown(results: dict) -> str:
    models = list(results["models"])
    base = models[0]
    lines = ["# Where a fine-tuning step's time goes: unpruned against pruned ResNet-56", "",
             f"`{results['command']}`", "",
             f"{results['environment']['cpu']}, {results['threads']} threads, batch {results['batch_size']}, "
             f"{results['steps']} steps profiled per model and setting in each of {results['rounds']} rounds, "
             "milliseconds per step, medians over the rounds (self CPU time per kind of operator; the rate bench, "
             "timed in turns, measures the speed-up). MACs per image: "
             + ", ".join(f"{m} {results['models'][m]['macs'] / 1e6:.1f}M" for m in models) + ".", ""]
    for setting, per_model in results["settings"].items():
        lines += [f"## {setting}", "", "| kind | " + " | ".join(models) + " | " +
                  " | ".join(f"{base} / {m}" for m in models[1:]) + " |",
                  "|---|" + "---:|" * (2 * len(models) - 1)]
        kinds = [*KINDS, "outside operators (data, Python)"]
        for k in [*kinds, "step (wall)"]:
            values = [per_model[m]["ms_per_step"] if k == "step (wall)" else per_model[m]["kinds"].get(k, 0.0)
                      for m in models]
            ratios = [f"{values[0] / v:.2f}x" if v else "" for v in values[1:]]
            name = f"**{k}**" if k == "step (wall)" else k
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " | " + " | ".join(ratios) + " |")
        lines += ["", "Convolutions by shape (forward and backward, ms per step; the ten costliest of each model):", "",
                  "| model | " + " | ".join(f"shape {i + 1}" for i in range(10)) + " |", "|---|" + "---|" * 10]
        for m in models:
            top = list(per_model[m]["convolutions"].items())[:10]
            lines.append(f"| {m} | " + " | ".join(f"{k}: {v:.1f}" for k, v in top) + " |" * (11 - len(top)))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="batches profiled per model, setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="every model and setting profiled once in each")
    parser.add_argument("--model", type=Path, default=None,
                        help="also profile this pruned artifact (a model.safetensors)")
    args = parser.parse_args()

    from allocation import RATE_SETTINGS, rate_models
    from tqdm import tqdm

    from edgeprune import load
    from edgeprune.environment import environment
    from edgeprune.fsio import write_json, write_text
    from edgeprune.measure import count_macs
    from edgeprune.recover import training_precision

    recipe, model, pruned, train = rate_models()
    models = {"unpruned": model, "pruned (uniform)": pruned}
    if args.model:
        models[f"pruned ({args.model.parent.name or args.model.name})"] = load(args.model)
    example = model.edgeprune_spec.example_input()
    opts = recipe.recover.model_copy(update={"epochs": 1, "distill": False})
    precision = training_precision("cpu", True)
    # bf16 where the CPU has it: what recover.amp runs untimed (a fine-tune of 100 steps or more keeps the faster of it
    # and FP32)
    names = {"": f"{precision} channels-last (recover.amp untimed)", "_fp32": "fp32 channels-last",
             "_contiguous": "fp32 contiguous"}
    settings = {names[k]: v for k, v in RATE_SETTINGS.items() if k or precision != "fp32"}  # "" is FP32 there
    results = {"command": "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/train_profile.py",
                                                                                 *sys.argv[1:]]),
               "environment": environment(), "steps": args.steps, "batch_size": opts.batch_size,
               "models": {name: {"macs": count_macs(m, example)} for name, m in models.items()}, "settings": {}}
    runs = [(setting, name) for setting in settings for name in models]
    profiles: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for i in tqdm(range(args.rounds), desc="rounds"):
        for setting, name in runs[i % len(runs):] + runs[:i % len(runs)]:
            profiles[setting, name].append(profile_finetune(models[name], train,
                                                            opts.model_copy(update=settings[setting]), args.steps))
    for setting, name in runs:
        results["settings"].setdefault(setting, {})[name] = _median(profiles[setting, name])
    results["rounds"] = args.rounds
    results["threads"] = profiles[runs[0]][0]["threads"]
    write_json(RESULTS, results)
    write_text(RESULTS.with_suffix(".md"), _markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()

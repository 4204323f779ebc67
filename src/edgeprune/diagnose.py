"""Why isn't it faster? Per-layer MACs and measured time for the baseline and the pruned model.

ONNX Runtime's own profiler times every kernel of the optimized graph; fused nodes (Conv+BN+ReLU,
NCHWc layout) are traced back to the conv/linear layer they came from through the exported
graph's node scopes (`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1`). PyTorch is timed per
layer with forward hooks (eager CPU execution is synchronous). Everything else (pooling, adds,
layout reorders) is summed per operator type.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .measure import ort_runner, ort_session, ort_waiting, time_interleaved, torch_threads
from .pruning import out_channels, prunable_layers
from .pruning.rules import forward_with_layer_hooks
from .recipe import LatencyOptions
from .results import Diagnosis, from_json

ALIGN = 8  # channel multiple that vectorized CPU kernels (AVX-512: 16 floats, NCHWc blocks of 8/16) like
_PASS_THROUGH = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "BatchNormalization",
                 "Mul", "Add", "Identity"}


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each conv/linear layer for one input of `example`'s batch."""
    macs: dict[str, int] = {}

    def hook(name, mod, inputs, out):
        if isinstance(mod, nn.Linear):
            per_out = mod.in_features
        else:
            per_out = (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))
        macs[name] = macs.get(name, 0) + int(out[0].numel()) * per_out

    forward_with_layer_hooks(model, example, hook)
    return macs


def torch_layer_ms(model: nn.Module, example: torch.Tensor, opts: LatencyOptions) -> dict[str, float]:
    """Median eager PyTorch time (ms) of each conv/linear layer over `opts.repeats` forward passes."""
    names = {m: n for n, m in prunable_layers(model).items()}
    starts: dict[str, float] = {}
    runs: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)

    def pre(mod, inputs):
        starts[names[mod]] = time.perf_counter()

    def post(mod, inputs, out):
        current[names[mod]] += time.perf_counter() - starts[names[mod]]

    model = model.eval()
    x = torch.randn(opts.batch_size, *example.shape[1:])
    hooks = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch_threads(opts.threads), torch.inference_mode():
            for _ in range(opts.warmup):
                model(x)
            for _ in range(opts.repeats):
                current.clear()
                model(x)
                for name, seconds in current.items():
                    runs[name].append(seconds)
    finally:
        for h in hooks:
            h.remove()
    return {name: float(np.median(t)) * 1e3 for name, t in runs.items()}


def _scope_to_module(node_name: str, modules: set[str]) -> str | None:
    """`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1` when that module exists."""
    parts = [p for p in node_name.split("/") if p][:-1]
    path = last = ""
    for part in parts:  # a Sequential's children are scoped "<its local name>.<index>"
        if last and part.startswith(last + "."):
            path = path[: len(path) - len(last)] + part
        else:
            path = f"{path}.{part}" if path else part
        last = part
    return path if path in modules else None


def _origin_map(onnx_path: Path, modules: set[str]) -> dict[str, str]:
    """Name of each node or tensor in the exported graph -> the conv/linear module it belongs to."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    origin: dict[str, str] = {}

    def source(node, depth=0):
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            return _scope_to_module(node.name, modules)
        if node.op_type not in _PASS_THROUGH or depth > 4:
            return None
        for name in node.input:  # an activation or a residual add fused into the conv before it
            if name in producer:
                found = source(producer[name], depth + 1)
                if found:
                    return found
        return None

    for node in graph.node:
        module = source(node)
        if module:
            origin[node.name] = module
            for out in node.output:
                origin[out] = module
    return origin


def ort_layer_ms(onnx_path: Path, modules: set[str], input_size, opts: LatencyOptions) -> tuple[dict, dict]:
    """ONNX Runtime's profiler: (median ms per conv/linear module, median ms per other op type)."""
    origin = _origin_map(onnx_path, modules)
    with tempfile.TemporaryDirectory(prefix="edgeprune-profile-") as tmp:
        sess = ort_session(onnx_path, opts.threads, **ort_waiting(opts), profile_prefix=os.path.join(tmp, "ort"))
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
            (opts.batch_size, *input_size)).astype(np.float32)}
        for _ in range(opts.warmup):
            sess.run(None, feed)
        for _ in range(opts.repeats):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # Event timestamps are microseconds since the session started; keep the timed runs only.
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs = runs[-opts.repeats:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    for event in nodes:
        run = next((i for i, r in enumerate(runs) if r["ts"] <= event["ts"] <= r["ts"] + r["dur"]), None)
        if run is None:
            continue
        node = event["name"][: -len("_kernel_time")]
        key = node[: -len("_nchwc")] if node.endswith("_nchwc") else node
        module = origin.get(key)
        if module:
            per_layer[module][run] += event["dur"] / 1e3
        else:
            per_op[event["args"].get("op_name", "other")][run] += event["dur"] / 1e3
    return ({m: float(np.median(t)) for m, t in per_layer.items()},
            {op: float(np.median(t)) for op, t in per_op.items()})


def _profile(model: nn.Module, onnx_path: Path, opts: LatencyOptions) -> dict:
    model = model.cpu()  # evaluation or fine-tuning may have left it on a GPU; this profiles the CPU
    spec = model.edgeprune_spec
    example = spec.example_input()
    modules = set(prunable_layers(model))
    ort_ms, ort_other = ort_layer_ms(onnx_path, modules, spec.input_size, opts)
    return {"macs": layer_macs(model, example), "torch_ms": torch_layer_ms(model, example, opts),
            "ort_ms": ort_ms, "ort_other_ms": ort_other}


def diagnose(baseline: nn.Module, baseline_onnx: Path, pruned: nn.Module, pruned_onnx: Path,
             opts: LatencyOptions, speedup: dict[str, float] | None = None, top: int = 5) -> Diagnosis:
    """Per-layer table (MACs, measured ms in ONNX Runtime and PyTorch, widths, alignment) for both
    models, and findings: how close each runtime's speed-up comes to the MACs reduction, and which
    layers and operators hold the remaining time. `speedup` (whole-model, from `measure`) is used
    for the findings when given; otherwise the per-layer sums stand in."""
    before, after = _profile(baseline, baseline_onnx, opts), _profile(pruned, pruned_onnx, opts)
    modules = prunable_layers(baseline)
    widths_before = {n: out_channels(m) for n, m in modules.items()}
    widths_after = {n: out_channels(m) for n, m in prunable_layers(pruned).items()}
    layers = []
    for name in widths_before:
        after_width = widths_after.get(name, widths_before[name])
        layers.append({
            "name": name, "kind": type(modules[name]).__name__,
            "channels_before": widths_before[name], "channels_after": after_width,
            "aligned": after_width % ALIGN == 0 or after_width == widths_before[name],
            "macs_before": before["macs"].get(name, 0), "macs_after": after["macs"].get(name, 0),
            "ort_ms_before": before["ort_ms"].get(name, 0.0), "ort_ms_after": after["ort_ms"].get(name, 0.0),
            "torch_ms_before": before["torch_ms"].get(name, 0.0), "torch_ms_after": after["torch_ms"].get(name, 0.0),
        })
    totals = {
        "macs_before": sum(before["macs"].values()), "macs_after": sum(after["macs"].values()),
        "ort_layers_ms_before": sum(before["ort_ms"].values()), "ort_layers_ms_after": sum(after["ort_ms"].values()),
        "ort_other_ms_before": sum(before["ort_other_ms"].values()),
        "ort_other_ms_after": sum(after["ort_other_ms"].values()),
        "torch_layers_ms_before": sum(before["torch_ms"].values()),
        "torch_layers_ms_after": sum(after["torch_ms"].values()),
    }
    result = {"runs": opts.repeats, "threads": opts.threads, "batch_size": opts.batch_size, "align": ALIGN,
              "layers": layers, "totals": totals,
              "ort_other_ms": {"before": before["ort_other_ms"], "after": after["ort_other_ms"]},
              "thread_scaling": thread_scaling(baseline_onnx, pruned_onnx, baseline.edgeprune_spec.input_size, opts)}
    result["findings"] = findings(result, speedup, top)
    return from_json(Diagnosis, result)


def thread_scaling(baseline_onnx: Path, pruned_onnx: Path, input_size, opts: LatencyOptions) -> dict | None:
    """ONNX Runtime median ms of both models on 1 thread and on `opts.threads`, the four timed side by side:
    a pruned model's small layers split less well across threads than the unpruned model's, so its speed-up
    depends on the thread count. None on one thread."""
    if opts.threads <= 1:
        return None
    counts, paths = (1, opts.threads), {"before": baseline_onnx, "after": pruned_onnx}
    timed = time_interleaved({f"{key}@{n}": ort_runner(path, input_size, opts.batch_size, n,
                                                       **ort_waiting(opts))
                              for n in counts for key, path in paths.items()}, opts)
    return {key: {str(n): timed[f"{key}@{n}"].median_ms for n in counts} for key in paths}


def _thread_finding(scaling: dict, macs_x: float, threads: int) -> str:
    one, many = "1", str(threads)
    x1 = scaling["before"][one] / scaling["after"][one]
    xn = scaling["before"][many] / scaling["after"][many]
    gain_before = scaling["before"][one] / scaling["before"][many]
    gain_after = scaling["after"][one] / scaling["after"][many]
    return (f"ONNX Runtime on 1 thread: {x1:.2f}x faster ({x1 / macs_x:.0%} of what the MACs reduction promises); "
            f"on {threads} threads: {xn:.2f}x ({xn / macs_x:.0%}), timed side by side. On {threads} threads the "
            f"unpruned model runs {gain_before:.2f}x as fast as on 1, the pruned one {gain_after:.2f}x"
            + (": its smaller layers split less well across threads." if gain_after < 0.95 * gain_before else "."))


# Two side-by-side readings of one speed-up in a run further apart than this: the machine's speed changed while
# timing. Readings taken seconds apart on a steady machine differed by 2-8% in our runs; one taken while the
# pruned ResNet-50 ran 37% slower than moments before differed by 21%.
DISAGREE = 1.15


def _timings_disagree(scaling: dict, measured: float | None, threads: int) -> str | None:
    """A sentence when the measurement's ONNX Runtime speed-up and the thread-scaling one at the same thread count,
    both timed side by side in this run, disagree by more than DISAGREE."""
    if not measured:
        return None
    again = scaling["before"][str(threads)] / scaling["after"][str(threads)]
    apart = max(measured, again) / min(measured, again)
    if apart <= DISAGREE:
        return None
    return (f"The two side-by-side timings of this run disagree: ONNX Runtime {measured:.2f}x faster in the "
            f"measurement, {again:.2f}x in the diagnosis on {threads} threads ({apart - 1:.0%} apart). The machine's "
            "speed changed while timing (other processes, clock changes; small models feel it most): "
            "`edgeprune benchmark OUT --baseline` times both models again.")


def _time_change(layer: dict) -> str:
    before, after = layer["ort_ms_before"], layer["ort_ms_after"]
    if after <= 0 or before <= 0:
        return "time not measured"
    return f"time {before / after:.1f}x less" if before >= after else f"time {after / before:.1f}x MORE"


def findings(diag: dict, speedup: dict[str, float] | None, top: int = 5) -> list[str]:
    """Plain sentences: speed-up against MACs reduction per runtime, where the time went, misalignment."""
    t = diag["totals"]
    macs_x = t["macs_before"] / max(t["macs_after"], 1)
    ort_total_before = t["ort_layers_ms_before"] + t["ort_other_ms_before"]
    ort_total_after = t["ort_layers_ms_after"] + t["ort_other_ms_after"]
    measured = {"ort_cpu": ort_total_before / max(ort_total_after, 1e-9),
                "torch_cpu": t["torch_layers_ms_before"] / max(t["torch_layers_ms_after"], 1e-9)}
    measured.update({k: v for k, v in (speedup or {}).items() if k in measured})
    out = []
    for key, label in (("ort_cpu", "ONNX Runtime"), ("torch_cpu", "PyTorch")):
        x = measured[key]
        out.append(f"{label}: {x:.2f}x faster against {macs_x:.2f}x fewer conv/linear MACs, "
                   f"{x / macs_x:.0%} of what the MACs reduction promises.")
    if diag.get("thread_scaling"):
        out.append(_thread_finding(diag["thread_scaling"], macs_x, diag["threads"]))
        if disagreement := _timings_disagree(diag["thread_scaling"], (speedup or {}).get("ort_cpu"), diag["threads"]):
            out.append(disagreement)
    layers = sorted(diag["layers"], key=lambda la: la["ort_ms_after"], reverse=True)
    if t["ort_layers_ms_after"] == 0:
        out.append("ONNX Runtime's kernels could not be traced back to layers (the exported node names carry "
                   "no module scopes, as with the dynamo exporter); only per-operator times are shown.")
    elif ort_total_after > 0:
        named = [f"{la['name']} {la['ort_ms_after'] / ort_total_after:.0%}"
                 + (f" (MACs {la['macs_before'] / max(la['macs_after'], 1):.1f}x fewer, {_time_change(la)})"
                    if la["channels_before"] != la["channels_after"] or la["macs_before"] != la["macs_after"]
                    else " (not pruned)") for la in layers[:top]]
        out.append("Layers holding most of the pruned model's ONNX Runtime time: " + ", ".join(named) + ".")
        other = diag["ort_other_ms"]["after"]
        if other:
            ops = sorted(other.items(), key=lambda kv: kv[1], reverse=True)[:3]
            out.append(f"Outside conv/linear layers: {t['ort_other_ms_after'] / ort_total_after:.0%} of the pruned "
                       f"model's time ({', '.join(f'{op} {ms:.2f} ms' for op, ms in ops)}); "
                       f"{t['ort_other_ms_before']:.2f} ms before pruning, {t['ort_other_ms_after']:.2f} ms after"
                       + ("; layout reorders appear when widths stop fitting ONNX Runtime's NCHWc blocks."
                          if any(op.startswith("Reorder") for op, _ in ops) else "."))
        groups: dict[str, float] = defaultdict(float)
        for la in diag["layers"]:
            groups[la["name"].split(".")[0]] += la["ort_ms_after"]
        if len(groups) > 2:
            ranked = sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:4]
            out.append("By top-level block: " + ", ".join(f"{g} {ms / ort_total_after:.0%}" for g, ms in ranked) + ".")
        unpruned = [la for la in diag["layers"] if la["channels_before"] == la["channels_after"]]
        share = sum(la["ort_ms_after"] for la in unpruned) / ort_total_after
        if unpruned and share > 0.1:
            out.append(f"{len(unpruned)} layers keep their full width and take {share:.0%} of the pruned model's "
                       "time (the classifier head, ignored layers, and layers coupled to an unprunable one).")
    misaligned = [la for la in diag["layers"] if not la["aligned"]]
    if misaligned:
        ms = sum(la["ort_ms_after"] for la in misaligned)
        out.append(f"{len(misaligned)} pruned layers have widths that are not multiples of {diag['align']} "
                   f"({ms:.2f} ms in ONNX Runtime), e.g. "
                   + ", ".join(f"{la['name']} = {la['channels_after']}" for la in misaligned[:3])
                   + f"; --round-to {diag['align']} or 16 keeps vector lanes full, but moves each layer from the "
                   "width the allocation chose (a sensitivity allocation's most of all): compare the accuracy too.")
    return out

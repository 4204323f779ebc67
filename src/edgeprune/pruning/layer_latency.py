"""What each point of a sensitivity analysis saves in latency on the target runtime.

Masking a group's channels (how `sensitivity.analyse` scores it) changes no run time, and timing a
physically pruned whole model per point would drown a single group's saving in noise. Instead every
conv/linear layer a point changes is built alone at its unpruned widths and at the point's widths (random
weights, the input shape it sees in the model), exported and timed on the runtime side by side with all
the others; a point saves the sum over its layers of (unpruned ms - pruned ms). This is what makes the
allocation latency-aware: on a CPU runtime a 16-channel layer cut to 3 channels still runs on a full
vector lane, so it saves far less time than MACs.
Identical layer shapes (the blocks of one stage) are built and timed once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..measure import time_interleaved
from ..recipe import LatencyOptions
from .rules import forward_with_layer_hooks, prunable_layers
from .sensitivity import Sensitivity

LAYER_MIN_REPEATS = 100  # single layers run in tens of microseconds: a steadier median for little wall time


def _input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape (without the batch) of every conv/linear layer for `example`."""
    shapes: dict[str, tuple[int, ...]] = {}
    forward_with_layer_hooks(model, example, lambda name, module, inputs, output: shapes.setdefault(
        name, tuple(inputs[0].shape[1:])))
    return shapes


def _config(module: nn.Module, shape: Sequence[int], cin: int, cout: int) -> tuple:
    """What a standalone copy of `module` with `cin` inputs and `cout` outputs computes (a hashable key)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        # any conv (a subclass such as timm's Conv2dSame too) is timed as the plain torch.nn conv of its kind
        kind = f"Conv{'Transpose' if module.transposed else ''}{len(module.kernel_size)}d"
        return (kind, cin, cout, module.kernel_size, module.stride, module.padding, module.dilation,
                module.output_padding if module.transposed else None, depthwise, module.bias is not None,
                module.padding_mode, tuple(shape[1:]))
    return ("Linear", cin, cout, module.bias is not None, tuple(shape[:-1]))


def _standalone(config: tuple) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer of `config` alone (random weights) and its input size."""
    kind, cin, cout = config[:3]
    if kind == "Linear":
        return nn.Linear(cin, cout, bias=config[3]), (*config[4], cin)
    kernel, stride, padding, dilation, output_padding, depthwise, bias, padding_mode, spatial = config[3:]
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                  groups=cin if depthwise else 1, padding_mode=padding_mode)
    if output_padding is not None:
        kwargs["output_padding"] = output_padding
    return getattr(nn, kind)(cin, cout, **kwargs), (cin, *spatial)


def time_savings(model: nn.Module, example: torch.Tensor, sens: Sensitivity, runtime: str,
                 runner_for: Callable[[nn.Module, tuple[int, ...], str], Callable[[], None]],
                 latency: LatencyOptions, quiet: bool = True) -> None:
    """Fill every point's `latency_saved_ms` (and `sens.latency_runtime`): `runner_for(layer, input_size,
    name)` returns one run of a standalone layer on `runtime`."""
    t0 = time.time()
    shapes = _input_shapes(model, example)
    layers = prunable_layers(model)

    def config(name: str, cin: int, cout: int) -> tuple:
        return _config(layers[name], shapes[name], cin, cout)

    def full(name: str) -> tuple:
        m = layers[name]
        if isinstance(m, nn.Linear):
            return config(name, m.in_features, m.out_features)
        return config(name, m.in_channels, m.out_channels)

    configs: dict[tuple, str] = {}
    for group in sens.groups:
        for point in group.points:
            for name, (cin, cout) in point.widths.items():
                for c in (full(name), config(name, cin, cout)):
                    configs.setdefault(c, f"layer-{len(configs)}")
    runners = {}
    for c, key in configs.items():
        layer, size = _standalone(c)
        runners[key] = runner_for(layer, size, key)
    timed = time_interleaved(runners, latency.model_copy(update={"repeats": max(latency.repeats,
                                                                                LAYER_MIN_REPEATS)}),
                             quiet=quiet, desc="timing layers")
    ms = {c: timed[key].median_ms for c, key in configs.items()}
    for group in sens.groups:
        for point in group.points:
            point.latency_saved_ms = round(sum(ms[full(n)] - ms[config(n, cin, cout)]
                                               for n, (cin, cout) in point.widths.items()), 5)
    sens.latency_runtime = runtime
    sens.latency_seconds = round(time.time() - t0, 1)

"""Iterative pruning (`prune.steps`): the widths a one-shot prune would give, reached in N steps.

The target (ratio, MACs, latency, sensitivity allocation) is resolved once, on the unpruned model,
into the width of every conv/linear layer. Step k of N then prunes each layer to the width k/N of the
way there, ranking channels on the weights the previous steps' fine-tuning left, so the last step
lands on exactly the one-shot plan's widths (the same MACs and latency) with different channels kept.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..recipe import PruneOptions
from .core import prune_copy
from .rules import out_channels, prunable_layers


def epoch_shares(epochs: int, steps: int) -> list[int]:
    """The fine-tuning epochs after each of `steps` steps, `epochs` in all; later steps get the remainder
    (the last step's model is the one shipped)."""
    base, extra = divmod(epochs, steps)
    return [base + (1 if k >= steps - extra else 0) for k in range(steps)]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """The output width of every conv and linear layer, by name."""
    return {n: out_channels(m) for n, m in prunable_layers(model).items()}


def step_widths(start: dict[str, int], final: dict[str, int], step: int, steps: int,
                round_to: int | None = None) -> dict[str, int]:
    """Each layer's width after `step` of `steps` (1-based): `step / steps` of the channels between its
    unpruned and its final width removed, rounded towards keeping; intermediate widths are rounded up to
    a multiple of `round_to` (never past the unpruned width or below the final one)."""
    widths = {}
    for name, c0 in start.items():
        cf = final[name]
        w = c0 - (c0 - cf) * step // steps
        if round_to and step < steps:
            w = max(cf, min(c0, math.ceil(w / round_to) * round_to))
        widths[name] = w
    return widths


def prune_to_widths(model: nn.Module, example: torch.Tensor, opts: PruneOptions, widths: dict[str, int],
                    unpruned: Iterable[str], grads: dict[str, torch.Tensor]) -> tuple[nn.Module, list]:
    """A copy of `model` with every layer pruned to `widths` (the channels ranked by `opts.importance`,
    each group on its own); and its pruning history."""
    current = layer_widths(model)
    keep = set(unpruned)
    # Torch-Pruning keeps int(channels * (1 - ratio)) channels of a group: aim half a channel above the width
    ratios = {n: 1 - (w + 0.5) / current[n] for n, w in widths.items() if n not in keep and w < current[n]}
    local = opts.model_copy(update={"round_to": None, "allocation": "uniform", "global_pruning": False,
                                    "max_layer_ratio": 1.0})
    pruned, history = prune_copy(model, example, local, 0.0, keep, grads, ratios)
    got = layer_widths(pruned)
    missed = {n: (got[n], w) for n, w in widths.items() if got[n] != w}
    if missed:  # coupled layers given different widths, or Torch-Pruning counting otherwise: a bug of ours
        raise RuntimeError(f"pruning step missed its planned widths (got, planned): {missed}")
    return pruned, history

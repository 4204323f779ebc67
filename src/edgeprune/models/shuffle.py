"""ShuffleNet V2 in a form DepGraph can trace.

torchvision's InvertedResidual splits its input with `chunk(2)` and mixes the branches with a channel
shuffle (`view` into groups, `transpose`, `view` back). Torch-Pruning cannot index either: its reshape
mapping divides by zero on the shuffle, its split mapping runs off the end of the chunk. The same
function written with `index_select` (a split is a selection of channels, the shuffle a fixed
permutation) traces, and every layer whose output channels flow through such a selection is then kept
whole (`edgeprune.pruning.rules`): what is left to prune are the channels inside each branch (the first
1x1 conv, the depthwise conv after it, and the input of the last 1x1 conv) and the stem and last conv.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.shufflenetv2 import InvertedResidual


def _select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, index.to(x.device))


class IndexedShuffleBlock(InvertedResidual):
    """torchvision's InvertedResidual, computing the same outputs with channel selections instead of
    `chunk` and the view/transpose shuffle (tested equal); its weights and state dict keys are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            half = x.shape[1] // 2
            x1 = _select(x, torch.arange(half))
            x2 = _select(x, torch.arange(half, 2 * half))
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        channels = out.shape[1]  # channel_shuffle(out, 2): channel i*2+g of the result is g*(C/2)+i
        return _select(out, torch.arange(channels).view(2, channels // 2).t().reshape(-1))


def rewrite_channel_shuffles(model: nn.Module) -> int:
    """Turn every ShuffleNet V2 block of `model` into an IndexedShuffleBlock, in place; how many."""
    count = 0
    for module in model.modules():
        if type(module) is InvertedResidual:
            module.__class__ = IndexedShuffleBlock
            count += 1
    return count

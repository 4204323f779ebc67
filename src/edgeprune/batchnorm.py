"""Training-mode batch norm for channels-last layers whose width does not fill the CPU's vector lanes.

PyTorch's CPU batch norm in the channels-last layout vectorizes along the channels, and on a layer 8, 24 or 33
channels wide (what pruning leaves) its training forward and backward ran 2.6-6x slower than at 16 channels on 2
cores of an AVX-512 Xeon (`python bench/batchnorm_layout.py --repeats 15`). Here the channels-last activation is
viewed as rows of `k` consecutive pixels (k * C values, C the width), so that every per-channel sum becomes a column
sum over a wide, contiguous matrix, then folded back to C channels. The arithmetic is the same batch norm: the batch
mean, the biased variance for normalizing and the unbiased one for the running estimate, the running statistics
updated as `nn.BatchNorm2d` updates them, and the same gradients. Sums accumulate in FP32 (float64 for float64
input; the squares and products summed are rounded to the input's precision first, a random error); the variance is
taken around the batch mean rounded to the input's precision, so bf16 input loses nothing to cancellation; the
output and the input's gradient are per-channel affine maps computed by PyTorch's own inference batch norm, in FP32
with FP32 coefficients, rounded once to the input's precision.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

LANES = 16  # AVX-512: 16 FP32 lanes; PyTorch's channels-last batch norm is fast at multiples of this width
ROW = 256  # values per row of the packed view: a multiple of every width's lanes


class _Handle:
    """Undoes `use_packed_batch_norm` on one module (the shape of a hook handle)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def use_packed_batch_norm(model: nn.Module) -> list[_Handle]:
    """Run every BatchNorm2d of `model` whose width is not a multiple of LANES through `packed_batch_norm` while in
    training mode (in eval mode, and for other input, PyTorch's own). The modules, their parameters and the state
    dict are unchanged; each returned handle's `remove()` restores the module's own forward."""
    handles = []
    for module in model.modules():
        if type(module) is nn.BatchNorm2d and module.num_features % LANES:
            module.forward = _forward.__get__(module)  # an instance attribute, shadowing the class's forward
            handles.append(_Handle(module))
    return handles


def _forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if not self.training or x.dim() != 4 or x.numel() == 0 or not _supported(x.dtype, self.weight):
        return nn.BatchNorm2d.forward(self, x)
    return packed_batch_norm(self, x)


def _supported(dtype: torch.dtype, weight: torch.Tensor | None) -> bool:
    """FP32 and float64 batches, and bf16 ones with FP32 parameters (as under autocast), which PyTorch's inference
    kernel normalizes in FP32; not fp16 (its squares overflow) nor an all-bf16 model."""
    param = torch.float32 if weight is None else weight.dtype
    if dtype in (torch.float32, torch.float64):
        return param == dtype
    return dtype == torch.bfloat16 and param == torch.float32


def packed_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn(x)` in training mode, computed on the packed view of channels-last `x` (copied to channels-last when it
    is not); returns channels-last output."""
    n, c, h, w = x.shape
    pixels = n * h * w
    if pixels < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    k = math.gcd(ROW // math.gcd(c, ROW), pixels)  # pixels per row: rows of k * c values (ROW's multiple if it can)
    # a name in profiles (bench/train_profile.py); torch.compile ignores it, and says so
    with contextlib.nullcontext() if torch.compiler.is_compiling() else \
            torch.profiler.record_function("edgeprune::packed_batch_norm"):
        y, mean, var = _PackedBatchNorm.apply(x.contiguous(memory_format=torch.channels_last), bn.weight, bn.bias,
                                              bn.eps, k)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None \
            and bn.num_batches_tracked is not None:
        with torch.no_grad():  # as nn.BatchNorm2d.forward and F.batch_norm update them
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_((var * (pixels / (pixels - 1))).to(bn.running_var.dtype), factor)
    return y


class _PackedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels-last (N, C, H, W) tensor viewed as (N*H*W / k, k*C)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, k: int):
        n, c, h, w = x.shape
        pixels = n * h * w
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = x.permute(0, 2, 3, 1).reshape(pixels // k, k * c)  # a view: channels-last is (N, H, W, C) in memory

        def channel_sums(t: torch.Tensor) -> torch.Tensor:
            return t.sum(0, dtype=acc).view(k, c).sum(0, dtype=torch.float64)

        mean = channel_sums(rows) / pixels
        shift = mean.to(x.dtype)  # centred on a value x's precision holds exactly: no cancellation below
        centred = rows - shift.repeat(k)
        offset = mean - shift.double()  # the mean of `centred`
        var = (channel_sums(centred * centred) / pixels - offset * offset).clamp_min(0)
        mean, var, offset = mean.to(acc), var.to(acc), offset.to(acc)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)  # normalize with the batch's statistics
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(centred, weight, offset, rstd)
        ctx.k, ctx.shape, ctx.has_bias = k, (n, c, h, w), bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: one raises rather than comes out wrong
    def backward(ctx, grad, _grad_mean, _grad_var):
        centred, weight, offset, rstd = ctx.saved_tensors
        k, (n, c, h, w) = ctx.k, ctx.shape
        pixels = n * h * w
        acc = offset.dtype
        grad = grad.contiguous(memory_format=torch.channels_last)
        g = grad.permute(0, 2, 3, 1).reshape(pixels // k, k * c)
        grad_bias = g.sum(0, dtype=acc).view(k, c).sum(0)
        grad_weight = rstd * ((g * centred).sum(0, dtype=acc).view(k, c).sum(0) - offset * grad_bias)  # sum(g*xhat)
        scale = rstd if weight is None else weight * rstd
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = (centred - offset) * rstd
        #    = scale * g + a * centred + b
        a = -scale * rstd * grad_weight / pixels
        b = -scale * grad_bias / pixels - a * offset
        # each term by PyTorch's inference batch norm (x * weight + bias per channel): it computes in FP32 with FP32
        # coefficients and rounds once, where coefficients rounded to bf16 would bias every element of a channel
        zero, one = torch.zeros_like(rstd), torch.ones_like(rstd)
        dx = F.batch_norm(centred.view(n, h, w, c).permute(0, 3, 1, 2), zero, one, a, b, False, 0.0, 0.0)
        dx += F.batch_norm(grad, zero, one, scale, None, False, 0.0, 0.0)
        return (dx, None if weight is None else grad_weight.to(weight.dtype),
                grad_bias.to(weight.dtype) if ctx.has_bias else None, None, None)

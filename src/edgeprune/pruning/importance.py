"""Importance criteria: Torch-Pruning's, a fixed Hessian (OBD) criterion, and the calibration
gradients the gradient-based criteria (taylor, hessian) rank by."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

GRADIENT_CRITERIA = ("taylor", "hessian")
SYNTHETIC_BATCH = 8  # images per random batch when no calibration data is given


class HessianImportance(tp.importance.GroupHessianImportance):
    """OBD importance w^2 * E[g^2], with the per-sample accumulation Torch-Pruning 1.6.1 gets wrong.

    Upstream `accumulate_grad` tests `name in self._accu_grad` but stores under `param`, so every
    call overwrites the last: only the final sample's g^2 survives. Here entries are keyed by param.
    """

    def accumulate_grad(self, model: nn.Module) -> None:
        for param in model.parameters():
            if param.grad is None:
                continue
            g2 = param.grad.detach().pow(2)
            if param in self._accu_grad:
                self._accu_grad[param] += g2
                self._counter[param] += 1
            else:
                self._accu_grad[param] = g2.clone()
                self._counter[param] = 1

    def mean_squared_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        return {p: g / self._counter[p] for p, g in self._accu_grad.items()}

    def __call__(self, group):
        if self._accu_grad:
            for p, g in self.mean_squared_grads().items():
                p.grad = g
            self.zero_grad()
        return super().__call__(group)


def make_importance(name: str):
    """A fresh Torch-Pruning importance object for the recipe's criterion name."""
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn-scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": HessianImportance,
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "random": tp.importance.RandomImportance,
    }[name]()


def importance_for_grads(name: str):
    """The criterion to rank with once calibration gradients are in `.grad`: for hessian they are
    already mean squared per-sample gradients, which upstream's criterion scores as they are."""
    importance = make_importance(name)
    if isinstance(importance, HessianImportance):
        return tp.importance.GroupHessianImportance()
    return importance


def calibration_grads(model: nn.Module, example: torch.Tensor, importance: str, batches: Iterable | None,
                      n_batches: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Per-parameter gradients (taylor) or mean squared per-sample gradients (hessian) by parameter
    name, over `n_batches` of `(images, labels)`; and whether they came from random inputs (no data)."""
    synthetic = batches is None
    if synthetic:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n_batches, SYNTHETIC_BATCH, *example.shape[1:], generator=gen)
        batches = [(xb, None) for xb in x]
    model.zero_grad(set_to_none=True)
    hessian = HessianImportance() if importance == "hessian" else None
    model.eval()
    for i, (x, y) in enumerate(batches):
        if i == n_batches:
            break
        logits = model(x)
        if y is None:  # no data given: the model's own predictions stand in for labels
            y = logits.argmax(1).detach()
        loss = F.cross_entropy(logits, y, reduction="none" if hessian else "mean")
        if hessian is None:
            loss.backward()
            continue
        for j, sample_loss in enumerate(loss):
            model.zero_grad(set_to_none=True)
            sample_loss.backward(retain_graph=j < len(loss) - 1)
            hessian.accumulate_grad(model)
    names = {p: n for n, p in model.named_parameters()}
    if hessian is not None:
        grads = {names[p]: g for p, g in hessian.mean_squared_grads().items()}
    else:
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, synthetic

"""Recovering a pruned detector: BatchNorm re-calibration on training images, then fine-tuning the
pruned model itself (never rebuilt from its YAML) with Ultralytics' detection loss, its augmentation
(mosaic, closed for the last epochs) and an EMA of the weights, distilling from the unpruned detector.

Distillation matches the student's raw head outputs to the teacher's at every anchor: class scores by
binary cross-entropy against the teacher's probabilities, and box side distributions (DFL bins) by KL
divergence, weighted by the teacher's confidence so that background anchors count little.

As for classifiers (`recover.training_layout`, `recover.autocast_context`), the forward and backward passes run
under bf16 autocast on CPUs with native bf16 (`recover.amp`), in the channels-last layout (`recover.channels_last`),
with the packed batch norm at widths that leave AVX-512 lanes empty (`recover.packed_batchnorm`); the loss, the
distillation, the weights, the optimizer and the EMA stay FP32. The teacher is not folded (`recover.fold_teacher`
is for classifiers): folding it with Ultralytics' `fuse()` gained nothing consistent
(bench/detection_train_rate.py).

A checkpoint (tensors only, loaded with weights_only) is written after every epoch; `resume`
continues from it, with each epoch's shuffling and augmentation seeded from (seed, epoch).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.yolo import detect_head, ultralytics
from ..recipe import RecoverOptions
from ..recover import (
    EpochResult,
    FinetuneResult,
    autocast_context,
    choose_precision,
    precision_note,
    read_checkpoint,
    recalibrate_bn_on,
    resume_training,
    training_layout,
    warmup_cosine,
    write_checkpoint,
)
from .data import DetectionData, dataset, loader

GRAD_CLIP = 10.0  # Ultralytics' max gradient norm


def _images(batch: dict) -> torch.Tensor:
    return batch["img"].float() / 255


def recalibrate(model: nn.Module, data: DetectionData, images: int, batch_size: int, seed: int = 0,
                quiet: bool = True) -> int:
    """BatchNorm statistics re-estimated on `images` training images, letterboxed as at evaluation."""
    train = dataset(data, "train", model.edgeprune_spec.input_size[-1])
    idx = np.random.default_rng(seed).permutation(len(train))[:images].tolist()
    batches = (_images(b) for b in loader(torch.utils.data.Subset(train, idx), batch_size))
    return recalibrate_bn_on(model, batches, "cpu", seed, quiet, total=math.ceil(len(idx) / batch_size))


def _raw_head(model: nn.Module, x: torch.Tensor, train: bool) -> dict:
    """The Detect head's raw outputs: {"boxes": (B, 4 * reg_max, A), "scores": (B, nc, A)}.
    The teacher runs in eval mode (frozen BatchNorm) with only its head asked for the raw outputs."""
    if train:
        return model(x)
    head = detect_head(model)
    head.training = True  # the head's own flag alone: its BatchNorms stay in eval mode
    try:
        return model(x)
    finally:
        head.training = False


def distillation(student: dict, teacher: dict, reg_max: int, temperature: float) -> torch.Tensor:
    """Per-anchor distillation of class scores (BCE to the teacher's probabilities) and box bins (KL)."""
    t_prob = teacher["scores"].sigmoid()
    weight = t_prob.amax(1)  # (B, A): the teacher's confidence that an object is there
    norm = weight.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(student["scores"], t_prob, reduction="none").mean(1)
    b, _, a = student["boxes"].shape
    s_bins = student["boxes"].view(b, 4, reg_max, a)
    t_bins = teacher["boxes"].view(b, 4, reg_max, a)
    t = temperature
    kl = F.kl_div(F.log_softmax(s_bins / t, 2), F.log_softmax(t_bins / t, 2), reduction="none",
                  log_target=True).sum(2).mean(1) * t * t
    return ((cls + kl) * weight).sum() / norm


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Ultralytics' grouping: conv weights decay; BatchNorm weights and every bias do not."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
            (decay if name == "weight" and not bn else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, opts: RecoverOptions) -> torch.optim.Optimizer:
    groups = _param_groups(model, opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr, betas=(opts.momentum, 0.999))
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.nesterov)


def finetune(student: nn.Module, teacher: nn.Module | None, data: DetectionData, opts: RecoverOptions,
             checkpoint: Path | None = None, resume: bool = False, seed: int = 0, quiet: bool = True,
             tag: str | None = None, evaluate=None, log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune `student` in place; the EMA of its weights is what it ends with. `log` hears the arithmetic
    chosen (`recover.choose_precision`), and why."""
    ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.torch_utils import ModelEMA

    imgsz = student.edgeprune_spec.input_size[-1]
    close = min(opts.close_mosaic, opts.epochs)
    hyp = get_cfg(overrides={"imgsz": imgsz, "task": "detect", "mode": "train", "epochs": opts.epochs,
                             "close_mosaic": close, "mosaic": 1.0 if close < opts.epochs else 0.0})
    train = dataset(data, "train", imgsz, train=True, hyp=hyp)
    student.args = hyp  # the loss reads its box / cls / dfl gains there, once
    criterion = v8DetectionLoss(student)
    del student.args
    reg_max = detect_head(student).reg_max
    images = min(opts.train_images or len(train), len(train))
    steps = math.ceil(images / opts.batch_size)
    optimizer = _optimizer(student, opts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opts.epochs * steps, opts.warmup))
    ema = ModelEMA(student)
    result, start = FinetuneResult(), 0
    state = read_checkpoint(checkpoint, tag, resume)
    if state is not None:
        start = resume_training(state, result, student, optimizer, scheduler)
        ema.ema.load_state_dict(state["ema"])
        ema.updates = int(state["ema_updates"])
    distill = teacher is not None and opts.distill_alpha > 0
    # after the EMA copied the student and before its first update, which binds it to the student's tensors
    sample = student.edgeprune_spec.example_input()
    with training_layout(opts, student, teacher, sample, "cpu") as (layout, teacher, packed):
        result.channels_last, result.packed_batchnorms = layout == torch.channels_last, packed

        def loss_of(batch: dict, autocast) -> torch.Tensor:  # the loss, with its forward passes under autocast
            x = _images(batch).contiguous(memory_format=layout)
            with autocast():
                preds = _raw_head(student, x, train=True)
                with torch.no_grad():
                    t_preds = _raw_head(teacher, x, train=False) if distill else None
            preds = _fp32(preds)
            loss, _ = criterion(preds, batch)
            loss = loss.sum()
            if distill:
                kd = distillation(preds, _fp32(t_preds, feats=False), reg_max, opts.temperature) * len(x)
                loss = (1 - opts.distill_alpha) * loss + opts.distill_alpha * opts.distill_gain * kd
            return loss

        def make_probe() -> Callable[[str], None]:  # training steps without the EMA's update
            # the training set's first images from a dataset of its own (loading images fills Ultralytics' mosaic
            # buffer, which the epochs draw from), and an optimizer whose state is thrown away
            own = dataset(data, "train", imgsz, train=True, hyp=hyp)
            batch = next(iter(loader(torch.utils.data.Subset(own, range(min(opts.batch_size, len(own)))),
                                     opts.batch_size)))
            opt = _optimizer(student, opts)

            def step(precision: str) -> None:
                loss = loss_of(batch, autocast_context(precision, "cpu"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
                opt.step()
            return step

        student.train()
        result.precision, result.precision_step_s = choose_precision("cpu", opts.amp, opts.epochs * steps,
                                                                     make_probe, student, resumed=state)
        if log:
            log(precision_note(result.precision, result.precision_step_s))
        autocast = autocast_context(result.precision, "cpu")
        for epoch in range(start, opts.epochs):
            if epoch >= opts.epochs - close:
                train.close_mosaic(hyp)
            torch.manual_seed(seed * 1_000_003 + epoch)
            np.random.seed((seed * 7919 + epoch) % 2**32)  # Ultralytics' augmentation draws from numpy and random
            random.seed(seed * 7919 + epoch)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 7919 + epoch))[:images]
            batches = loader(torch.utils.data.Subset(train, order.tolist()), opts.batch_size, workers=opts.workers)
            student.train()
            t0, total, seen = time.time(), 0.0, 0
            for batch in tqdm(batches, desc=f"fine-tune {epoch + 1}/{opts.epochs}", disable=quiet, leave=False):
                loss = loss_of(batch, autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
                optimizer.step()
                scheduler.step()
                ema.update(student)
                total, seen = total + loss.item(), seen + len(batch["img"])
            epoch_result = EpochResult(epoch=epoch + 1, loss=total / max(seen, 1), lr=scheduler.get_last_lr()[0],
                                       seconds=round(time.time() - t0, 2), precision=result.precision)
            if evaluate is not None:
                acc = evaluate(ema.ema)
                epoch_result.map50_95, epoch_result.map50 = acc.map50_95, acc.map50
            result.epochs.append(epoch_result)
            if checkpoint is not None:
                write_checkpoint(checkpoint, tag, result, student, optimizer, scheduler, ema=ema.ema.state_dict(),
                                 ema_updates=ema.updates)
        student.load_state_dict(ema.ema.state_dict())
    student.eval()
    return result


def _fp32(preds: dict, feats: bool = True) -> dict:
    """The head's raw outputs in FP32 for the loss and the distillation (bf16 under autocast). The feature maps,
    of which the loss reads only shapes and dtype (its anchor grid), are detached FP32 copies; left out with
    `feats=False` (the distillation never reads them)."""
    out = {k: v.float() for k, v in preds.items() if k != "feats"}
    if feats and "feats" in preds:
        out["feats"] = [f.detach().float() for f in preds["feats"]]
    return out

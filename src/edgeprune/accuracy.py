"""Top-1 / top-5 accuracy of a PyTorch model, a pruned run folder or an exported ONNX model."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .distributed import Runtime
from .errors import EdgePruneError


@dataclass
class Accuracy:
    """Classifiers: top-1 / top-5; detectors: mAP50-95 / mAP50 (all percent)."""

    top1: float | None  # percent
    top5: float | None  # percent
    images: int
    map50_95: float | None = None  # percent
    map50: float | None = None  # percent


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[int, int]:
    """(top-1 hits, top-k hits) in a batch; k is capped at the number of classes."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return int(hits[:, :1].sum()), int(hits.any(1).sum())


def channels_last_copy(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """A copy of `model` in the channels-last memory layout (oneDNN and cuDNN convolutions run it faster),
    when it can run that way: `x` is an image
    batch, no parameter or buffer is 5-D, and the copy runs one channels-last image
    (a model that reshapes activations with .view() cannot). Otherwise None. The copy is on `x`'s device; the
    caller's model is untouched."""
    if x.dim() != 4 or any(t.dim() > 4 for t in (*model.parameters(), *model.buffers())):
        return None
    fast = copy.deepcopy(model).to(x.device, memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            fast.eval()(x[:1].contiguous(memory_format=torch.channels_last))  # eval: BatchNorm statistics kept
    except RuntimeError:  # the layout's fault: the caller's model runs contiguous batches
        return None
    return fast


@torch.no_grad()
def evaluate_model(model: nn.Module, data: DataLoader, rt: Runtime | None = None, quiet: bool = True,
                   desc: str = "evaluate") -> Accuracy:
    """Accuracy over `data` (each rank's shard, summed, under torchrun), run in the channels-last layout
    where the model allows it."""
    device = rt.device if rt else "cpu"
    model = model.eval().to(device)
    top1 = top5 = n = 0
    layout = torch.contiguous_format
    for x, y in tqdm(data, desc=desc, disable=quiet, leave=False):
        x = x.to(device, non_blocking=True)
        if n == 0 and (fast := channels_last_copy(model, x)) is not None:
            model, layout = fast, torch.channels_last
        logits = model(x.contiguous(memory_format=layout))
        c1, c5 = topk_correct(logits.float().cpu(), y, 5)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
    if rt is not None:
        top1, top5, n = rt.all_sum([top1, top5, n])
    if n == 0:
        raise EdgePruneError("the evaluation set holds no images; check the dataset's val/ (or test/) split")
    return Accuracy(top1=100.0 * top1 / n, top5=100.0 * top5 / n, images=int(n))


def evaluate_onnx_predictions(path: str | os.PathLike, data: DataLoader, threads: int = 2,
                              quiet: bool = True, runtime: str = "ort_cpu") -> tuple[Accuracy, np.ndarray]:
    """The accuracy computed by `runtime` (ONNX Runtime, or OpenVINO with `ov_cpu`) on the exported file,
    and every image's top-1 class."""
    from .measure import onnx_predictor

    return evaluate_predictor(onnx_predictor(path, runtime, threads), data, quiet, f"evaluate {Path(path).name}")


def evaluate_predictor(predict, data: DataLoader, quiet: bool = True,
                       desc: str = "evaluate") -> tuple[Accuracy, np.ndarray]:
    """Top-1/top-5 of `predict` (a float32 NumPy batch -> logits) on `data`, and every image's top-1 class."""
    top1 = top5 = n = 0
    predictions = []
    for x, y in tqdm(data, desc=desc, disable=quiet, leave=False):
        logits = torch.from_numpy(predict(x.numpy()))
        c1, c5 = topk_correct(logits, y, 5)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
        predictions.append(logits.argmax(1).numpy())
    if n == 0:
        raise EdgePruneError("the evaluation set holds no images; check the dataset's val/ (or test/) split")
    return Accuracy(top1=100.0 * top1 / n, top5=100.0 * top5 / n, images=int(n)), np.concatenate(predictions)


def evaluate_onnx(path: str | os.PathLike, data: DataLoader, threads: int = 2, quiet: bool = True,
                  runtime: str = "ort_cpu") -> Accuracy:
    return evaluate_onnx_predictions(path, data, threads, quiet, runtime)[0]


def evaluate(model: nn.Module | str | os.PathLike, data: str | os.PathLike, *, weights: str = "default",
             num_classes: int | None = None, onnx: bool = False, limit: int | None = None, batch_size: int = 500,
             threads: int = 2, quiet: bool = True, imgsz: int | None = None, trust_pickle: bool = False) -> Accuracy:
    """Accuracy on the evaluation split (val/ or test/) of `data` (`cifar10` or an ImageFolder root);
    for a YOLO detector, mAP50-95 / mAP50 on the val split of a data.yaml.

    `model` is a model (built by `create_model` or loaded by `edgeprune.load`), a model name (built
    with `weights`), or a prune run folder; with `onnx`, the run folder's model.onnx is evaluated
    through ONNX Runtime. `limit` evaluates an even subset of that many images.
    """
    from .artifact import load
    from .data import load_split, loader
    from .distributed import runtime
    from .measure import torch_threads
    from .models import create_model

    folder = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if isinstance(model, nn.Module):
        net = model
    elif folder is not None and folder.is_dir():
        net = load(folder)
    else:
        net = create_model(str(model), weights, num_classes, imgsz=imgsz, trust_pickle=trust_pickle)
    if not hasattr(net, "edgeprune_spec"):
        raise EdgePruneError("evaluate needs a model built by edgeprune.create_model or loaded by edgeprune.load")
    if onnx and (folder is None or not (folder / "model.onnx").is_file()):
        raise EdgePruneError(f"onnx evaluation needs a run folder holding model.onnx, not {model}")
    if net.edgeprune_spec.task == "detect":
        return _evaluate_detector(net, data, folder / "model.onnx" if onnx else None, limit, threads, quiet)
    batches = loader(load_split(data, net.edgeprune_spec, train=False, quiet=quiet), batch_size, limit=limit)
    if onnx:
        return evaluate_onnx(folder / "model.onnx", batches, threads, quiet)
    with torch_threads(threads):
        return evaluate_model(net, batches, runtime(), quiet)


def _evaluate_detector(net: nn.Module, data: str | os.PathLike, onnx_path: Path | None, limit: int | None,
                       threads: int, quiet: bool) -> Accuracy:
    """mAP50-95 / mAP50 of a YOLO detector on the val split of a data.yaml."""
    from .detection import metrics
    from .detection.data import is_detection_data, load_detection_data
    from .measure import torch_threads
    from .pipeline import check_detection_data

    if not is_detection_data(str(data)):
        raise EdgePruneError(f"{net.edgeprune_spec.name} is a detector: --data must be a YOLO data.yaml, not {data}")
    det = check_detection_data(load_detection_data(data), net.edgeprune_spec)
    if onnx_path is not None:
        return metrics.evaluate_onnx(onnx_path, det, net.edgeprune_spec.input_size[-1], threads, limit=limit,
                                     quiet=quiet)
    with torch_threads(threads):
        return metrics.evaluate_model(net, det, limit=limit, quiet=quiet)

"""Top-1 / top-5 accuracy of a PyTorch model or an exported ONNX model over a dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .distributed import Runtime


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[int, int]:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return int(hits[:, :1].sum()), int(hits.any(1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader, rt: Runtime | None = None, quiet: bool = True,
             desc: str = "evaluate") -> dict:
    """{"top1", "top5"} in percent over `data` (each rank's shard, summed, under torchrun)."""
    device = rt.device if rt else "cpu"
    model = model.eval().to(device)
    top1 = top5 = n = 0
    for x, y in tqdm(data, desc=desc, disable=quiet, leave=False):
        logits = model(x.to(device, non_blocking=True))
        c1, c5 = _topk_correct(logits.float().cpu(), y, 5)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
    if rt is not None:
        top1, top5, n = rt.all_sum([top1, top5, n])
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}


def evaluate_onnx(path: str | os.PathLike, data: DataLoader, threads: int = 2, quiet: bool = True,
                  keep_predictions: bool = False) -> dict:
    """The same accuracy, computed by ONNX Runtime on the exported file (with every image's top-1
    class under "predictions" when `keep_predictions`)."""
    from .measure import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    top1 = top5 = n = 0
    predictions = []
    for x, y in tqdm(data, desc=f"evaluate {Path(path).name}", disable=quiet, leave=False):
        logits = torch.from_numpy(np.asarray(sess.run(None, {name: x.numpy()})[0]))
        c1, c5 = _topk_correct(logits, y, 5)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
        if keep_predictions:
            predictions.append(logits.argmax(1).numpy())
    result = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}
    if keep_predictions:
        result["predictions"] = np.concatenate(predictions)
    return result

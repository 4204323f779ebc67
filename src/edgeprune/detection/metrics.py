"""mAP50-95 and mAP50 of a detector, in PyTorch or through ONNX Runtime, with Ultralytics' validator.

Every backend sees the same letterboxed batches and its raw head output (B, 4 + nc, anchors) goes
through the same post-processing (Ultralytics' NMS and matching), so PyTorch, FP32 ONNX and INT8
figures differ only by what the model computes.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..accuracy import Accuracy
from ..errors import EdgePruneError
from .data import DetectionData, dataset, loader

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] -> (B, 4 + nc, anchors)


def even_subset(ds, limit: int | None):
    """The first `limit` images (the val split has no class folders to balance)."""
    if limit is None or limit >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, list(range(limit)))


def evaluate(predict: Predict, data: DetectionData, imgsz: int, batch_size: int = 32, limit: int | None = None,
             quiet: bool = True, desc: str = "mAP") -> Accuracy:
    """mAP (percent) of `predict` on the val split of `data`."""
    from ultralytics.models.yolo.detect import DetectionValidator

    from ..quiet import quiet_stdout

    val = dataset(data, "val", imgsz)
    batches = loader(even_subset(val, limit), batch_size)
    with tempfile.TemporaryDirectory(prefix="edgeprune-val-") as tmp, quiet_stdout():
        v = DetectionValidator(save_dir=Path(tmp), args={"task": "detect", "imgsz": imgsz, "batch": batch_size,
                                                          "plots": False, "save_json": False, "verbose": False,
                                                          "half": False, "rect": False})
        v.data, v.device, v.stride, v.training = data.ultralytics_dict(), torch.device("cpu"), 32, False
        v.dataloader = batches
        v.init_metrics(type("Names", (), {"names": data.names})())
        for batch in tqdm(batches, desc=desc, disable=quiet, leave=False):
            batch = v.preprocess(batch)
            with torch.no_grad():
                preds = predict(batch["img"])
            v.update_metrics(v.postprocess(preds), batch)
        stats = v.get_stats()
    if v.seen == 0:
        raise EdgePruneError(f"{data.yaml}: the val split holds no images")
    return Accuracy(top1=None, top5=None, images=int(v.seen), map50_95=100 * float(stats["metrics/mAP50-95(B)"]),
                    map50=100 * float(stats["metrics/mAP50(B)"]))


def evaluate_model(model: nn.Module, data: DetectionData, batch_size: int = 32, limit: int | None = None,
                   quiet: bool = True, desc: str = "mAP") -> Accuracy:
    model = model.eval()
    return evaluate(lambda x: model(x), data, model.edgeprune_spec.input_size[-1], batch_size, limit, quiet, desc)


def evaluate_onnx(path: str | os.PathLike, data: DetectionData, imgsz: int, threads: int = 2, batch_size: int = 32,
                  limit: int | None = None, quiet: bool = True, runtime: str = "ort_cpu") -> Accuracy:
    """mAP of the ONNX file at `path` run by `runtime` (ONNX Runtime, or OpenVINO with `ov_cpu`)."""
    from ..measure import onnx_predictor

    run = onnx_predictor(path, runtime, threads)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(x.numpy()))

    return evaluate(predict, data, imgsz, batch_size, limit, quiet, desc=f"mAP {Path(path).name}")


def calibration_loader(data: DetectionData, imgsz: int, count: int, seed: int = 0):
    """`count` training images, letterboxed as at evaluation and scaled to [0, 1], in batches of
    (images, unused labels): the INT8 calibration data."""
    train = dataset(data, "train", imgsz)
    idx = np.random.default_rng(seed).permutation(len(train))[:count]
    images = torch.stack([train[int(i)]["img"].float() / 255 for i in idx])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(len(images))), 32)


def head_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """The nodes of the Detect head's decoding (everything in its scope but the convs and their
    activations): they mix pixel coordinates and probabilities in one tensor, which one INT8 scale
    cannot hold, so they stay in float."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    convs = {n.output[0] for n in graph.node if n.op_type == "Conv"}
    head = _head_scope(graph)
    keep = []
    for node in graph.node:
        if head is None or not node.name.startswith(head) or node.op_type == "Conv":
            continue
        if node.op_type in ("Sigmoid", "Mul") and any(i in convs for i in node.input) and "/dfl/" not in node.name:
            continue  # SiLU of a head conv: quantized with its conv
        keep.append(node.name)
    return keep


def _head_scope(graph) -> str | None:
    """The name prefix of the last module scope holding the DFL (`/model.22/`)."""
    for node in graph.node:
        if "/dfl/" in node.name:
            return node.name.split("/dfl/")[0] + "/"
    return None

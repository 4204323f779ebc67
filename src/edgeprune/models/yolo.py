"""Ultralytics YOLO detectors (`yolov8n.yaml`, `yolo11s.yaml`, ...) built offline, in a form DepGraph can prune.

Two changes make a detector prunable, both exact (the model computes the same function):
- every C2f / C3k2 block's first conv, whose output is split in halves with `chunk`, becomes two convs,
  one per half (`SplitC2f`): DepGraph cannot index a channel split of a pruned tensor;
- the Detect head returns its decoded predictions alone (`export` mode), so that the model maps an
  image batch to one tensor (B, 4 + nc, anchors), the raw head output before NMS, in PyTorch and ONNX.
In ONNX only, the DFL box decoding takes its softmax on the last axis (`export_form`), which ONNX
Runtime runs six times faster.
The head's box, class and DFL convs are never pruned (`head_layers`).

`ultralytics` is an optional extra: `pip install -e '.[yolo]'`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

from ..assets import ASSETS, cache_home, resolve_asset
from ..errors import EdgePruneError, first_line

DEFAULT_IMGSZ = 640
# Heads other than plain detection (segmentation, pose, OBB, classification, world/yoloe) are refused.
_OTHER_TASKS = ("-seg", "-pose", "-obb", "-cls", "-world", "yoloe", "rtdetr")


def is_yolo_name(name: str) -> bool:
    """An Ultralytics model YAML: a stock name (yolov8n.yaml) or the path of the user's own (any .yaml)."""
    return name.endswith((".yaml", ".yml"))


def _stock(name: str) -> bool:
    return "/" not in name and name.startswith("yolo")


def ultralytics():
    """Import ultralytics offline and quiet (no update checks, fonts or telemetry); one line when missing."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_home() / "ultralytics"))
    try:
        import ultralytics as ul
    except ImportError:
        raise EdgePruneError("YOLO detectors need ultralytics: pip install -e '.[yolo]' (or pip install "
                             "ultralytics==8.4.190)") from None
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync"):
        SETTINGS.update(sync=False)
    return ul


class SplitC2f(nn.Module):
    """C2f / C3k2 with its first conv split in two: `cv1a` and `cv1b` compute the halves `chunk(2, 1)` took."""

    def __init__(self, block: nn.Module):
        super().__init__()
        from ultralytics.nn.modules import Conv

        conv = block.cv1
        c = block.c
        self.c = c
        self.cv1a = Conv(conv.conv.in_channels, c, conv.conv.kernel_size, conv.conv.stride, act=True)
        self.cv1b = Conv(conv.conv.in_channels, c, conv.conv.kernel_size, conv.conv.stride, act=True)
        for half, sl in ((self.cv1a, slice(0, c)), (self.cv1b, slice(c, 2 * c))):
            half.act = conv.act
            half.conv.weight.data.copy_(conv.conv.weight.data[sl])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(half.bn, name).data.copy_(getattr(conv.bn, name).data[sl])
            half.bn.eps, half.bn.momentum = conv.bn.eps, conv.bn.momentum
        self.cv2, self.m = block.cv2, block.m
        for attr in ("i", "f", "type", "np"):  # Ultralytics' graph bookkeeping (layer index, inputs)
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module) -> int:
    """Replace every C2f-like block (C2f, C3k2) of `model` by its `SplitC2f` form; returns how many."""
    from ultralytics.nn.modules import C2f

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in ("C2f", "C3k2") and isinstance(child, C2f):
                setattr(parent, name, SplitC2f(child))
                count += 1
    return count


def _dfl_last_axis(self, x: torch.Tensor) -> torch.Tensor:
    """DFL's expectation over the distance bins with the softmax on the last axis: Ultralytics' form
    (transpose, softmax over axis 1, a 1x1 conv) costs ONNX Runtime 1.8 ms on the CPU for a 256x256
    YOLOv8n, this one 0.3 ms (measured side by side); the same function within 3e-6."""
    b, _, a = x.shape
    bins = x.view(b, 4, self.c1, a).transpose(2, 3).softmax(-1)
    return (bins @ self.conv.weight.view(self.c1, 1)).view(b, 4, a)


@contextlib.contextmanager
def export_form(model: nn.Module):
    """While exporting to ONNX, every Ultralytics DFL of `model` computes with `_dfl_last_axis`. Only
    the exported graph changes; the module, its state dict and what DepGraph traces stay Ultralytics'."""
    blocks = sys.modules.get("ultralytics.nn.modules.block")
    dfls = [m for m in model.modules() if blocks is not None and isinstance(m, blocks.DFL)]
    for dfl in dfls:
        dfl.forward = types.MethodType(_dfl_last_axis, dfl)
    try:
        yield
    finally:
        for dfl in dfls:
            del dfl.forward


def detect_head(model: nn.Module) -> nn.Module:
    from ultralytics.nn.modules import Detect

    heads = [m for m in model.modules() if isinstance(m, Detect)]
    if len(heads) != 1:
        raise EdgePruneError(f"expected one Detect head, found {len(heads)}")
    return heads[0]


def head_layers(model: nn.Module) -> list[str]:
    """The convs that emit boxes and class scores (the last conv of every branch) and the DFL conv."""
    head = detect_head(model)
    prefix = next(n for n, m in model.named_modules() if m is head)
    names = []
    for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        for i, seq in enumerate(getattr(head, branch, None) or []):
            names.append(f"{prefix}.{branch}.{i}.{len(seq) - 1}")
    if isinstance(getattr(head, "dfl", None), nn.Module) and hasattr(head.dfl, "conv"):
        names.append(f"{prefix}.dfl.conv")
    return names


def attention_layers(model: nn.Module) -> list[str]:
    """Convs inside attention blocks (YOLO11's C2PSA, YOLO12's area attention): their channels are
    reshaped into heads."""
    from ultralytics.nn.modules import block

    kinds = tuple(getattr(block, k) for k in ("Attention", "AAttn") if hasattr(block, k))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            names += [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return names


def check_name(name: str) -> Path:
    """The Ultralytics YAML behind `name`; one line for other tasks or unknown names."""
    ultralytics()
    base = name.split("/")[-1]
    if any(tag in base for tag in _OTHER_TASKS):
        raise EdgePruneError(f"{name} is not a plain detection model; edgeprune prunes classifiers and YOLO detectors")
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(name)
    except FileNotFoundError:
        raise EdgePruneError(f"unknown YOLO model {name!r}: use an Ultralytics detection YAML such as yolov8n.yaml, "
                             "yolov8s.yaml, yolo11n.yaml, or the path of your own") from None
    return Path(cfg.get("yaml_file", name))


def _read_weights(weights: str, trust_pickle: bool) -> tuple[dict, dict]:
    """A state dict and its metadata (nc, imgsz) from a .safetensors file or a trusted Ultralytics .pt."""
    path = Path(weights)
    if not path.is_file():
        raise EdgePruneError(f"checkpoint {path} does not exist; check the --weights path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as exc:
            raise EdgePruneError(f"checkpoint {path} is not a readable safetensors file ({exc})") from exc
    if path.suffix != ".pt":
        raise EdgePruneError(f"YOLO weights must be none, a .safetensors state dict or an Ultralytics .pt, not {path}")
    if not trust_pickle:
        raise EdgePruneError(f"{path} is an Ultralytics checkpoint, a pickle that can run code when loaded; pass "
                             "--trust-pickle if you trust its source, or convert it to .safetensors")
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path))  # Ultralytics' own loader unpickles it: the user vouched for this file
    net = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(net, nn.Module):
        raise EdgePruneError(f"{path} holds no Ultralytics model ('model' or 'ema'); is it a YOLO checkpoint?")
    args = ckpt.get("train_args") or {}
    meta = {"nc": str(getattr(net, "nc", "") or len(getattr(net, "names", {}) or {}))}
    if isinstance(args, dict) and args.get("imgsz"):
        meta["imgsz"] = str(args["imgsz"])
    return {k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()}, meta


def create_detector(name: str, weights: str, num_classes: int | None, imgsz: int | None,
                    trust_pickle: bool = False):
    """(model, spec fields) for a YOLO detection YAML; weights `none`, a .safetensors state dict or a .pt."""
    check_name(name)
    from ultralytics.nn.tasks import DetectionModel  # noqa: I001 (imported once ultralytics is set up offline)

    from ..quiet import quiet_stdout
    from .factory import load_state

    if weights.lower() in ("default", "pretrained"):
        raise EdgePruneError("YOLO detectors have no default weights: pass --weights none, a .safetensors state dict, "
                             "an Ultralytics .pt with --trust-pickle, or a known tag (cifar10-det for yolov8n.yaml)")
    if weights in ASSETS.get(name, {}):
        weights = str(resolve_asset(name, weights))
    state, meta = ({}, {}) if weights.lower() == "none" else _read_weights(weights, trust_pickle)
    nc = num_classes or int(meta.get("nc") or 0) or 80
    if meta.get("nc") and num_classes and int(meta["nc"]) != num_classes:
        raise EdgePruneError(f"{weights} was trained for {meta['nc']} classes, not {num_classes}; drop --num-classes")
    try:
        with quiet_stdout():
            model = DetectionModel(name, nc=nc, verbose=False)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        if _stock(name):  # Ultralytics' own YAML: a bug, ours or theirs
            raise
        raise EdgePruneError(f"{name} does not build an Ultralytics detection model ({type(exc).__name__}: "
                             f"{first_line(exc)}); start from one of theirs, such as yolov8n.yaml") from exc
    head = detect_head(model)
    if getattr(head, "one2one_cv2", None) is not None or type(head).__name__ != "Detect":
        raise EdgePruneError(f"{name} has a {type(head).__name__} head with an end-to-end branch; edgeprune prunes "
                             "YOLO detectors with a plain Detect head (v8, v9, 11, 12)")
    if state:
        load_state(model, state, f"checkpoint {weights}")
    split_c2f(model)
    head.export = True  # eval forward returns the decoded predictions alone
    size = imgsz or int(meta.get("imgsz") or 0) or DEFAULT_IMGSZ
    if size % 32:
        raise EdgePruneError(f"--imgsz {size} must be a multiple of 32 (the detector's largest stride)")
    model.edgeprune_heads = head_layers(model)
    model.edgeprune_frozen = attention_layers(model)
    return model, nc, size

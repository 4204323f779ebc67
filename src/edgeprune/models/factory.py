"""`create_model(name, weights=..., num_classes=...)`: the single way models are built.

`weights` is `none` (random init), `default` (the model's known pretrained weights), a torchvision
weight name such as `IMAGENET1K_V2`, or the path of a local checkpoint.
"""
from __future__ import annotations

import difflib
import errno
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ..assets import ASSETS, edgeprune_home, resolve_asset
from ..errors import EdgePruneError, first_line
from .cifar_resnet import DEPTHS, CifarResNet
from .custom import create_custom, create_timm, is_import_name, is_timm_name, resolve_import
from .yolo import create_detector, is_yolo_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MODELS = {f"cifar_resnet{d}": d for d in DEPTHS}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt", ".safetensors")
# What torch.load(weights_only=True) raises on a truncated or foreign file: UnpicklingError (pickled
# objects, random bytes), RuntimeError (zip reader: no central directory, not a torch archive; legacy
# format cut short), EOFError (empty or cut-off pickle), KeyError/IndexError/ValueError/AssertionError
# (the restricted unpickler on a stream that is not a pickle, e.g. a text file). A truncated zip archive
# also surfaces as OSError EINVAL, handled apart so that other OSErrors keep their traceback.
CHECKPOINT_READ_FAILURES: tuple[type[Exception], ...] = (
    pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, AssertionError)


@dataclass
class ModelSpec:
    """What it takes to rebuild a model and feed it: recorded in every artifact."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str = "none"
    builder_kwargs: dict = field(default_factory=dict)
    task: str = "classify"  # or "detect" (YOLO: outputs (B, 4 + nc, anchors) before NMS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        data = dict(data)
        for key in ("input_size", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_size)


def list_models() -> list[str]:
    """Every model name `create_model` accepts."""
    return sorted(CIFAR_MODELS) + sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown_model(name: str) -> EdgePruneError:
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = (f"did you mean {', '.join(close)}?" if close else "run `edgeprune models` to list them (YOLO "
            "detectors: an Ultralytics YAML such as yolov8n.yaml)")
    return EdgePruneError(f"unknown model {name!r}: {hint}")


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(_CHECKPOINT_SUFFIXES) or Path(weights).exists()


def _torchvision_input_size(name: str) -> int:
    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return 224
    crop = getattr(default.transforms(), "crop_size", [224])
    return int(crop[0] if isinstance(crop, (list, tuple)) else crop)


def create_model(name: str, weights: str | os.PathLike | None = "none",
                 num_classes: int | None = None, imgsz: int | None = None, trust_pickle: bool = False,
                 model_args: dict | None = None, input_size: tuple[int, int, int] | list[int] | None = None
                 ) -> nn.Module:
    """Build `name` in eval mode; its `ModelSpec` is attached as `model.edgeprune_spec`.

    YOLO detectors (`yolov8n.yaml`, ...) also take `imgsz` (default: the checkpoint's training size, else
    640) and load an Ultralytics `.pt` pickle only with `trust_pickle`. `timm/NAME` builds a timm model;
    `path/to/file.py:NAME` or `package.module:NAME` calls the user's class or function with `model_args`
    (importing it runs that code). Those two take `input_size` (C, H, W; default timm's, else 3x224x224)."""
    weights = "none" if weights is None else str(weights)
    size = tuple(input_size) if input_size is not None else None
    if size is not None and not (is_timm_name(name) or is_import_name(name)):
        raise EdgePruneError(f"--input-size is for timm and custom models; {name} takes its own input size")
    if model_args and not is_import_name(name):
        raise EdgePruneError(f"--model-args is for custom models (FILE.py:NAME or package.module:NAME), not {name}")
    if is_timm_name(name):
        model, spec = _create_timm(name, weights, num_classes, size)
    elif is_import_name(name):
        model, spec = _create_custom(name, weights, num_classes, model_args or {}, size)
    elif is_yolo_name(name):
        model, nc, size = create_detector(name, weights, num_classes, imgsz, trust_pickle)
        spec = ModelSpec(name=name, num_classes=nc, input_size=(3, size, size), mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0), weights=weights, task="detect")
    elif imgsz is not None:
        raise EdgePruneError(f"--imgsz is for YOLO detectors; {name} takes its own input size")
    elif name in CIFAR_MODELS:
        model, spec = _create_cifar(name, weights, num_classes)
    elif name in torchvision.models.list_models(module=torchvision.models):
        model, spec = _create_torchvision(name, weights, num_classes)
        if name.startswith("shufflenet_v2"):
            from .shuffle import rewrite_channel_shuffles

            rewrite_channel_shuffles(model)  # the same function, in a form DepGraph can trace
    else:
        raise _unknown_model(name)
    model.eval()
    model.edgeprune_spec = spec
    return model


def _weights_path(weights: str, name: str) -> Path | None:
    """None for `none`; the checkpoint path otherwise (timm and custom models have no named weights here)."""
    if weights.lower() == "none":
        return None
    if not _looks_like_path(weights):
        raise EdgePruneError(f"weights {weights!r} for {name}: use none or a checkpoint path")
    return Path(weights)


def _create_timm(name: str, weights: str, num_classes: int | None, size):
    pretrained = weights.lower() in ("default", "pretrained")
    model, found = create_timm(name, pretrained, num_classes, size)
    path = None if pretrained else _weights_path(weights, name)
    if path is not None:
        load_checkpoint(model, path)
    spec = ModelSpec(name=name, num_classes=model.num_classes, input_size=found["input_size"],
                     mean=found["mean"], std=found["std"], weights=str(path) if path else weights)
    return model, spec


def _create_custom(name: str, weights: str, num_classes: int | None, model_args: dict, size):
    path = _weights_path(weights if weights.lower() != "default" else "none", name)
    model, found = create_custom(name, num_classes, model_args, size)
    if path is not None:
        load_checkpoint(model, path)
    spec = ModelSpec(name=resolve_import(name), num_classes=found["num_classes"], input_size=found["input_size"],
                     weights=str(path) if path else "none", builder_kwargs=dict(model_args))
    return model, spec


def rebuild(spec: ModelSpec) -> nn.Module:
    """The unpruned architecture `spec` describes, randomly initialised (what a pruned artifact replays its
    history on): the same builder, arguments and input size."""
    extra: dict = {}
    if spec.task == "detect":
        extra = {"imgsz": spec.input_size[-1]}
    elif is_import_name(spec.name):  # the user's code, called as it was
        extra = {"model_args": spec.builder_kwargs, "input_size": spec.input_size}
    elif is_timm_name(spec.name):
        extra = {"input_size": spec.input_size}
    return create_model(spec.name, weights="none", num_classes=spec.num_classes, **extra)


def _create_cifar(name: str, weights: str, num_classes: int | None):
    spec = ModelSpec(name=name, num_classes=num_classes or 10, input_size=(3, 32, 32), weights=weights)
    model = CifarResNet(CIFAR_MODELS[name], spec.num_classes)
    if weights.lower() == "none":
        return model, spec
    tags = ASSETS.get(name, {})
    if weights.lower() == "pretrained":
        weights = "default"
    if weights in tags:
        path = resolve_asset(name, weights)
    elif _looks_like_path(weights):
        path = Path(weights)
    else:
        raise EdgePruneError(f"weights {weights!r} for {name}: use none, {', '.join(tags)}, or a checkpoint path")
    load_checkpoint(model, path)
    spec.weights = str(path)
    return model, spec


def _create_torchvision(name: str, weights: str, num_classes: int | None):
    size = _torchvision_input_size(name)
    kwargs: dict = {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # auxiliary heads only run in training and would not be pruned
        kwargs["init_weights"] = False
    spec = ModelSpec(name=name, num_classes=num_classes or 1000, input_size=(3, size, size),
                     weights=weights, builder_kwargs=kwargs)
    if weights.lower() == "none" or _looks_like_path(weights):
        model = torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes, **kwargs)
        if weights.lower() != "none":
            load_checkpoint(model, Path(weights))
        return model, spec
    try:
        enum = torchvision.models.get_model_weights(name)
        wobj = enum[weights.upper()] if weights.upper() != "PRETRAINED" else enum.DEFAULT
    except (KeyError, ValueError):
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(name)) or "none"
        raise EdgePruneError(f"unknown weights {weights!r} for {name}: use none, a checkpoint path, or one of "
                             f"{names}") from None
    classes = len(wobj.meta["categories"])
    if num_classes not in (None, classes):
        raise EdgePruneError(f"{name} {wobj.name} has {classes} classes, not {num_classes}; fine-tune from "
                             "a checkpoint of your own or drop --num-classes")
    spec.num_classes = classes
    model = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs)
    try:
        state = wobj.get_state_dict(progress=False, model_dir=str(edgeprune_home() / "torchvision"))
    except (OSError, RuntimeError) as exc:
        raise EdgePruneError(f"could not download {name} {wobj.name} weights ({exc}); place the file in "
                             f"{edgeprune_home() / 'torchvision'} or pass --weights PATH") from None
    load_state(model, state, f"{name} {wobj.name}")
    spec.mean, spec.std = IMAGENET_MEAN, IMAGENET_STD
    return model, spec


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise EdgePruneError(f"checkpoint {path} does not exist; check the --weights path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as exc:  # truncated or foreign file; OSError (permissions, I/O) propagates
            raise EdgePruneError(f"checkpoint {path} is not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except CHECKPOINT_READ_FAILURES as exc:
        raise _unreadable(path, exc) from exc
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # permissions, I/O errors: a problem of the machine, not of the file
            raise
        raise _unreadable(path, exc) from exc  # torch's zip reader seeking past the end of a truncated file


def _unreadable(path: Path, exc: Exception) -> EdgePruneError:
    if isinstance(exc, pickle.UnpicklingError):
        reason = "it holds pickled Python objects, not only tensors, or is no PyTorch file"
    else:
        reason = first_line(exc, 120)
    return EdgePruneError(f"checkpoint {path} cannot be read safely ({reason}); it must be a state dict saved "
                          "with torch.save (no pickled modules) or a .safetensors file")


def _unwrap_state(obj) -> dict:
    """Find the tensor dict inside common checkpoint layouts and strip DataParallel/compile prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return _unwrap_state(obj[key])
    if not isinstance(obj, dict):
        raise EdgePruneError("checkpoint holds no state dict of tensors; save model.state_dict(), not the model")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # a training script's own layout, e.g. {"net": state_dict, "acc": .., "epoch": ..}: its one dict of tensors
        nested = [k for k, v in obj.items() if isinstance(v, dict) and v and
                  all(isinstance(t, torch.Tensor) for t in v.values())]
        if len(nested) == 1:
            return _unwrap_state(obj[nested[0]])
        found = f"several dicts of tensors ({', '.join(map(str, nested))})" if nested else "no dict of tensors"
        raise EdgePruneError(f"checkpoint holds {found} among its keys ({', '.join(map(str, list(obj)[:8]))}); "
                             "save the model's state_dict() alone, with torch.save or safetensors")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_state(model: nn.Module, state: dict, source: str) -> None:
    expected = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 lack BatchNorm's counter; it does not affect inference.
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(expected[key])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise EdgePruneError(f"{source} does not match the model: {'; '.join(parts)}; check --model")
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise EdgePruneError(
                f"{source} does not match the model: {key} has shape {tuple(state[key].shape)}, model expects "
                f"{tuple(tensor.shape)}; check --model and --num-classes (a pruned model loads with edgeprune.load)")
    model.load_state_dict(with_module_metadata(model, state), strict=True)


def with_module_metadata(model: nn.Module, state: dict) -> OrderedDict:
    """`state` carrying the module versions of `model` (safetensors files do not store them, and
    some modules, such as torchvision's MNASNet, refuse to load without them)."""
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local checkpoint safely (weights_only) into `model`, with clear errors on mismatch."""
    path = Path(path)
    load_state(model, _unwrap_state(_read_checkpoint(path)), f"checkpoint {path}")
    return model

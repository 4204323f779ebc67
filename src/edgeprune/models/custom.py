"""Models from elsewhere: timm by name (`timm/NAME`) and the user's own code (`path/to/file.py:NAME` or
`package.module:NAME`, a class or a function returning an nn.Module, with keyword arguments).

Importing a user's file runs it: only name code you trust. The artifact records the resolved import
path and the arguments, so `edgeprune.load` rebuilds the same architecture from the same code.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import EdgePruneError, first_line

TIMM_PREFIX = "timm/"
DEFAULT_INPUT_SIZE = (3, 224, 224)


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def is_import_name(name: str) -> bool:
    """`file.py:NAME` or `package.module:NAME` (not a timm or YOLO name)."""
    target, sep, attr = name.rpartition(":")
    return bool(sep and target and attr.isidentifier() and not is_timm_name(name))


def _timm():
    try:
        import timm
    except ImportError:
        raise EdgePruneError("timm models need timm: pip install -e '.[timm]' (or pip install timm==1.0.31)") from None
    return timm


def create_timm(name: str, pretrained: bool, num_classes: int | None,
                input_size: tuple[int, int, int] | None) -> tuple[nn.Module, dict]:
    """A timm model (random init, or timm's pretrained weights when `pretrained`), and its input size and
    normalisation from timm's pretrained config."""
    timm = _timm()
    arch = name[len(TIMM_PREFIX):]
    known = timm.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else "see timm.list_models()"
        raise EdgePruneError(f"unknown timm model {arch!r}: {hint}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, ValueError) as exc:  # only a download or a missing hub file can fail here with these
        if not pretrained:
            raise
        raise EdgePruneError(f"could not fetch timm's pretrained weights for {arch} ({first_line(exc, 120)}); "
                             "pass --weights PATH (a local checkpoint) or --weights none") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size") or DEFAULT_INPUT_SIZE)
    return model, {"input_size": size, "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                   "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


def resolve_import(name: str) -> str:
    """`name` with a file path made absolute, so that the artifact rebuilds from any directory."""
    target, _, attr = name.rpartition(":")
    return f"{Path(target).resolve()}:{attr}" if target.endswith(".py") else name


def _module(target: str):
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise EdgePruneError(f"model file {target} does not exist; pass --model path/to/file.py:NAME")
        key = f"edgeprune_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None:
            raise EdgePruneError(f"{target} cannot be imported as Python; pass a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            del sys.modules[key]
            raise EdgePruneError(f"{target} is not valid Python ({exc.msg}, line {exc.lineno})") from None
        except BaseException:
            del sys.modules[key]
            raise
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (target == exc.name or target.startswith(exc.name + ".")):
            raise  # the user's module imports something missing: their traceback says where
        raise EdgePruneError(f"cannot import {target!r} ({exc}); install the package or pass --model "
                             "path/to/file.py:NAME") from None


def create_custom(name: str, num_classes: int | None, model_args: dict,
                  input_size: tuple[int, int, int] | None) -> tuple[nn.Module, dict]:
    """The user's model: `NAME(**model_args)` from a file or an importable module, checked to be an
    nn.Module that maps a (1, *input_size) batch to (1, classes) logits."""
    target, _, attr = name.rpartition(":")
    module = _module(target)
    builder = getattr(module, attr, None)
    if not callable(builder):
        found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and
                       (inspect.isclass(v) and issubclass(v, nn.Module) or inspect.isfunction(v)))
        raise EdgePruneError(f"{target} has no class or function {attr!r}" +
                             (f"; it defines {', '.join(found[:5])}" if found else ""))
    kwargs = dict(model_args)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    if num_classes is not None and "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        raise EdgePruneError(f"--model-args do not fit {attr}{inspect.signature(builder)} ({exc})") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will tell
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise EdgePruneError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    size = tuple(input_size or DEFAULT_INPUT_SIZE)
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.randn(1, *size))
        except RuntimeError as exc:  # the user's forward at a size it does not take (its shapes, its channels)
            fix = ("pass --input-size C,H,W with the size it expects" if input_size is None else
                   "check --input-size against the model")
            raise EdgePruneError(f"{name} cannot run a (1, {', '.join(map(str, size))}) input "
                                 f"({first_line(exc)}); {fix} (--debug shows where it failed)") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EdgePruneError(f"{name} must return (batch, classes) logits for a (1, {', '.join(map(str, size))}) "
                             f"input, not {shape}; pass --input-size C,H,W if it expects another size")
    if num_classes is not None and out.shape[-1] != num_classes:
        raise EdgePruneError(f"{name} outputs {out.shape[-1]} classes, not --num-classes {num_classes}; set it in "
                             "--model-args")
    return model, {"input_size": size, "num_classes": int(out.shape[-1])}

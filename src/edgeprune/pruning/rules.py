"""Which layers may be pruned: conv/linear layers, minus the classifier head(s), the recipe's
ignores and the layers DepGraph couples through zero-padding or a channel selection."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import EdgePruneError, first_line
from ..quiet import quiet_stdout
from ..recipe import PruneOptions
from .guard import in_torch_pruning, trace_guard

PAD_REASON = ("output channels are coupled through a zero-padding op (F.pad), whose channel offset "
              "DepGraph cannot index; pruning them would break the residual stream")
SELECT_REASON = ("output channels pass through a channel split or shuffle (ShuffleNet's, as index_select), "
                 "whose channel order DepGraph cannot follow")
HEAD_REASON = "classifier head: its outputs are the classes"
DETECT_HEAD_REASON = "detection head: its outputs are the box distributions and class scores (and the fixed DFL)"
ATTENTION_REASON = "inside an attention block, whose channels are reshaped into heads"
IGNORED_REASON = "ignored by the recipe"

# What Torch-Pruning (and the forward pass of a model it pruned wrongly) raises on graphs it cannot
# handle: e.g. ZeroDivisionError on ShuffleNet's channel shuffle, IndexError on concat/split offsets
# and hard-coded reshapes, KeyError on unwrapped parameters, RuntimeError on shape mismatches (ViT's
# reshape after pruning), AssertionError and ValueError from its internal checks. A TypeError counts
# only where Torch-Pruning's own code raised it (Swin: a None channel count in its concat index
# mapping). Anything else (OSError, TypeError elsewhere, AttributeError, NameError, ...) is a bug or
# an environment problem and propagates with its traceback.
TORCH_PRUNING_FAILURES: tuple[type[Exception], ...] = (
    RuntimeError, IndexError, ZeroDivisionError, AssertionError, ValueError, KeyError)


def _innermost_file(exc: BaseException) -> str | None:
    """The file of the innermost Python frame of `exc`'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def raised_in_torch_pruning(exc: BaseException) -> bool:
    """Whether the innermost Python frame of `exc`'s traceback is Torch-Pruning's code."""
    file = _innermost_file(exc)
    return file is not None and in_torch_pruning(file)


def raised_in_our_pruning(exc: BaseException) -> bool:
    """Whether edgeprune's own pruning code (this package: the importance criteria Torch-Pruning calls back,
    the rules) raised `exc`: a bug of ours, which keeps its traceback."""
    file = _innermost_file(exc)
    return file is not None and Path(file).resolve().parent == Path(__file__).resolve().parent


def model_name(model: nn.Module) -> str:
    """The edgeprune model name, or the class name of a model not built by create_model."""
    return getattr(getattr(model, "edgeprune_spec", None), "name", type(model).__name__)


def unsupported(model: nn.Module, exc: BaseException) -> EdgePruneError:
    """The one-line error for a graph DepGraph could not prune; raise it `from exc`."""
    return EdgePruneError(f"{model_name(model)} cannot be pruned safely with DepGraph ({type(exc).__name__}: "
                          f"{first_line(exc)}); add the failing layers to prune.ignore or choose another model")


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv layer, output features of a linear one."""
    return module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer of `model` by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def forward_with_layer_hooks(model: nn.Module, example: torch.Tensor,
                             hook: Callable[[str, nn.Module, tuple, torch.Tensor], None]) -> None:
    """Run `model` (eval, no grad) on the first input of `example` with `hook(name, layer, inputs, output)`
    called for every conv/linear layer; the hooks are removed afterwards."""
    def attach(name: str):
        def fn(module, inputs, output) -> None:  # a hook returning a value would replace the output
            hook(name, module, inputs, output)
        return fn

    handles = [m.register_forward_hook(attach(n)) for n, m in prunable_layers(model).items()]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()


def find_heads(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The classifier head(s): the last conv/linear layer to run, and any layer emitting the class count."""
    layers = prunable_layers(model)
    order: list[str] = []
    names = {m: n for n, m in layers.items()}
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod])) for m in layers.values()]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise EdgePruneError("the model has no conv or linear layer to prune")
    num_classes = out.shape[-1]
    heads = [order[-1]] + [n for n in dict.fromkeys(order)
                           if n != order[-1] and isinstance(layers[n], nn.Linear)
                           and layers[n].out_features == num_classes]
    return heads


def build_graph(model: nn.Module, example: torch.Tensor, memory_gb: float | None = None,
                timeout_s: float | None = None) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, traced within the memory and time limits; a graph it cannot
    trace is a clear error, not a traceback."""
    try:
        with quiet_stdout(), trace_guard(model_name(model), memory_gb, timeout_s):
            return tp.DependencyGraph().build_dependency(model, example)
    except TORCH_PRUNING_FAILURES as exc:
        raise unsupported(model, exc) from exc
    except TypeError as exc:
        if not raised_in_torch_pruning(exc):
            raise
        raise unsupported(model, exc) from exc


# Ops DepGraph traces as element-wise although they move channels, by autograd node name: zero-padding
# (a channel offset) and index_select (ShuffleNet's split and shuffle, see models/shuffle.py).
COUPLING_OPS = {"Pad": PAD_REASON, "IndexSelect": SELECT_REASON}


def _cut_outputs(graph: tp.DependencyGraph, group, layers: dict[nn.Module, str]) -> list[str]:
    """The conv/linear layers whose output channels `group` cuts, by name, in order."""
    return list(dict.fromkeys(layers[dep.target.module] for dep, _ in group
                              if dep.target.module in layers and graph.is_out_channel_pruning_fn(dep.handler)))


def coupled_layers(model: nn.Module, example: torch.Tensor, unpruned: Iterable[str],
                   opts: PruneOptions) -> list[list[str]]:
    """The conv/linear layers whose output channels Torch-Pruning removes together, one list per group
    (a residual stream's layers, a split block's halves): they can only take one width."""
    graph = build_graph(model, example, opts.trace_memory_gb, opts.trace_timeout_s)
    layers = {m: n for n, m in prunable_layers(model).items()}
    modules = dict(model.named_modules())
    groups = graph.get_all_groups(ignored_layers=[modules[n] for n in unpruned if n in modules])
    return [names for group in groups if (names := _cut_outputs(graph, group, layers))]


def find_coupled(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module],
                     memory_gb: float | None = None, timeout_s: float | None = None) -> dict[str, str]:
    """Layers whose output channels DepGraph couples through a padding or channel-selection op (which it
    maps as if channels stayed in place): they must stay whole; each with the reason."""
    graph = build_graph(model, example, memory_gb, timeout_s)
    ops = {m: reason for m in graph.module2node if isinstance(m, tp.ops._ElementWiseOp)
           for key, reason in COUPLING_OPS.items() if key in str(m._grad_fn)}
    if not ops:
        return {}
    layers = {m: n for n, m in prunable_layers(model).items()}
    coupled: dict[str, str] = {}
    for group in graph.get_all_groups(ignored_layers=ignored):
        reasons = [ops[dep.target.module] for dep, _ in group if dep.target.module in ops]
        if reasons:
            for name in _cut_outputs(graph, group, layers):
                coupled.setdefault(name, reasons[0])
    return coupled


def resolve_unpruned(model: nn.Module, example: torch.Tensor, opts: PruneOptions) -> dict[str, str]:
    """The layers never pruned, each with the reason: heads, the recipe's ignores, pad-coupled layers."""
    modules = dict(model.named_modules())
    declared = getattr(model, "edgeprune_heads", None)  # set by the model's builder (YOLO detectors)
    if declared:
        unpruned = {name: DETECT_HEAD_REASON for name in declared}
    else:
        unpruned = {name: HEAD_REASON for name in find_heads(model, example)}
    for name in getattr(model, "edgeprune_frozen", ()):
        unpruned.setdefault(name, ATTENTION_REASON)
    for pattern in opts.ignore:
        hits = [n for n in prunable_layers(model) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise EdgePruneError(f"--ignore {pattern!r} matches no conv or linear layer; check the layer names "
                                 "with `edgeprune profile --layers`")
        unpruned.update({n: IGNORED_REASON for n in hits if n not in unpruned})
    ignored = [modules[n] for n in unpruned]
    for name, reason in find_coupled(model, example, ignored, opts.trace_memory_gb,
                                         opts.trace_timeout_s).items():
        unpruned.setdefault(name, reason)
    return unpruned

"""The safe pruned checkpoint: weights as safetensors, model spec and pruning history as JSON.

Nothing is pickled. Loading rebuilds the original architecture, replays the pruning history on
Torch-Pruning's dependency graph, then loads the weights strictly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EdgePruneError
from .fsio import atomic_path, read_json, write_json
from .models import ModelSpec
from .models.factory import rebuild, with_module_metadata
from .pruning.guard import trace_guard
from .quiet import quiet_stdout

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT = "edgeprune-pruned-v1"


def save(model: nn.Module, history: list, out_dir: str | os.PathLike) -> Path:
    """Write `model` (built by create_model, then pruned) to `out_dir`; returns the folder."""
    spec: ModelSpec | None = getattr(model, "edgeprune_spec", None)
    if spec is None:
        raise EdgePruneError("only models built by edgeprune.create_model can be saved as an artifact")
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_json(out_dir / META, {"format": FORMAT, "spec": spec.to_dict(),
                                "pruning_history": [list(h) for h in history]})
    return out_dir


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the pruned model saved in `path` (a run folder or its `model.json`), in eval mode."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    meta_path, weights_path = folder / META, folder / WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise EdgePruneError(f"{folder} holds no pruned model ({META} and {WEIGHTS}); pass a prune run folder")
    try:
        meta = read_json(meta_path)
        spec = ModelSpec.from_dict(meta["spec"])
        history = meta["pruning_history"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgePruneError(f"{meta_path} is corrupt ({exc}); re-run edgeprune prune") from None
    if meta.get("format") != FORMAT:
        raise EdgePruneError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT}")
    model = rebuild(spec)
    # DepGraph traces autograd, even if the caller is in no_grad; within the default tracing limits
    with quiet_stdout(), torch.enable_grad(), trace_guard(spec.name):
        graph = tp.DependencyGraph().build_dependency(model, spec.example_input())
    graph.load_pruning_history([tuple(h) for h in history])
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise EdgePruneError(f"{weights_path} is corrupt ({exc}); re-run edgeprune prune") from None
    try:
        model.load_state_dict(with_module_metadata(model, state), strict=True)
    except RuntimeError as exc:
        raise EdgePruneError(f"{weights_path} does not match its pruning history "
                             f"({str(exc).splitlines()[0]}); re-run edgeprune prune") from None
    model.edgeprune_spec = spec
    return model.eval()

"""edgeprune: measure, prune (Torch-Pruning DepGraph), recover, export and report CNNs for edge devices.

Everything the `edgeprune` command does is here: `run` a recipe (or `load_recipe` a YAML one),
`prune` a model directly, `evaluate` it, `export_run` a finished run again, `sweep` a trade-off.

The names below are imported on first use: `import edgeprune` (and the `edgeprune` command's start, its
--help and its option errors) does not pay for importing PyTorch, torchvision and Torch-Pruning.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# ONNX Runtime's PyPI wheels (1.29 on) start Microsoft's telemetry when they are imported: a device id and an
# event queue under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, uploaded when the network lets them.
# edgeprune runs on machines that should not call out; ORT_DISABLE_TELEMETRY=1 must be set before
# onnxruntime is imported, so it is set here. A value the user set (0 keeps telemetry on) is left alone.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_EXPORTS = {
    "Accuracy": "accuracy", "evaluate": "accuracy", "load": "artifact", "save": "artifact",
    "EdgePruneError": "errors", "create_model": "models", "list_models": "models", "export_run": "pipeline",
    "run": "pipeline", "PruneResult": "pruning", "prune": "pruning", "PruneOptions": "recipe", "Recipe": "recipe",
    "load_recipe": "recipe", "sweep": "sweeps",
}
__all__ = ["Accuracy", "EdgePruneError", "PruneOptions", "PruneResult", "Recipe", "create_model", "evaluate",
           "export_run", "list_models", "load", "load_recipe", "prune", "run", "save", "sweep"]

if TYPE_CHECKING:
    from .accuracy import Accuracy, evaluate
    from .artifact import load, save
    from .errors import EdgePruneError
    from .models import create_model, list_models
    from .pipeline import export_run, run
    from .pruning import PruneResult, prune
    from .recipe import PruneOptions, Recipe, load_recipe
    from .sweeps import sweep


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (edgeprune.pipeline, ...), as `import edgeprune` used to import them
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'edgeprune' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

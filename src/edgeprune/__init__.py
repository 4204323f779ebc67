"""edgeprune: measure, prune (Torch-Pruning DepGraph), recover, export and report CNNs for edge devices.

Everything the `edgeprune` command does is here: `run` a recipe (or `load_recipe` a YAML one),
`prune` a model directly, `evaluate` it, `export_run` a finished run again, `sweep` a trade-off.
"""
from .accuracy import Accuracy, evaluate
from .artifact import load, save
from .errors import EdgePruneError
from .models import create_model, list_models
from .pipeline import export_run, run
from .pruning import PruneResult, prune
from .recipe import PruneOptions, Recipe, load_recipe
from .sweeps import sweep

__version__ = "0.1.0"
__all__ = ["Accuracy", "EdgePruneError", "PruneOptions", "PruneResult", "Recipe", "create_model", "evaluate",
           "export_run", "list_models", "load", "load_recipe", "prune", "run", "save", "sweep"]

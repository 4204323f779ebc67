"""edgeprune: measure, prune (Torch-Pruning DepGraph), export and report CNNs for edge devices."""
from .artifact import load, save
from .errors import EdgePruneError
from .models import create_model, list_models
from .pipeline import run
from .prune import prune
from .recipe import load_recipe

__version__ = "0.1.0"
__all__ = ["EdgePruneError", "create_model", "list_models", "load", "load_recipe", "prune", "run", "save"]

"""One factory for every model: torchvision classifiers by name and the CIFAR ResNets."""
from .factory import ModelSpec, create_model, list_models, load_checkpoint

__all__ = ["ModelSpec", "create_model", "list_models", "load_checkpoint"]

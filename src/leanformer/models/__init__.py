"""Backbones (timm conventions) and the registry that builds them by name."""

from . import msmlp, swin  # noqa: F401  (importing registers the variants)
from ._checkpoint import load_checkpoint, read_state_dict
from ._registry import create_model, is_model, list_models, model_entrypoint, register_model, weight_bytes

__all__ = ["create_model", "is_model", "list_models", "load_checkpoint", "model_entrypoint", "read_state_dict",
           "register_model", "weight_bytes"]

"""Backbones (timm conventions) and the registry that builds them by name."""

from . import msmlp, swin  # noqa: F401  (importing registers the variants)
from ._checkpoint import load_checkpoint, read_state_dict
from ._registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "load_checkpoint", "read_state_dict", "register_model"]

"""leanformer: cheaper Transformers and MLP vision models to train, run and adapt.

The public API is re-exported here; see the pillars `models`, `memory`, `sparsity`, `adapters`.
"""

from .models import create_model, list_models, load_checkpoint

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load_checkpoint"]

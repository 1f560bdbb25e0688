"""leanformer: cheaper Transformers and MLP vision models to train, run and adapt.

The public API is re-exported here; see the packages `models`, `memory`, `data`, `train`.
"""

from .data import DataSplit, load_data
from .memory import (
    CompressionConfig,
    SavedActivationReport,
    compress_activations,
    compression_stats,
    decompress_activations,
    saved_activation_bytes,
)
from .models import create_model, list_models, load_checkpoint
from .train import TrainConfig, Trainer, TrainResult

__version__ = "0.1.0"
__all__ = [
    "CompressionConfig",
    "DataSplit",
    "SavedActivationReport",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "compress_activations",
    "compression_stats",
    "create_model",
    "decompress_activations",
    "list_models",
    "load_checkpoint",
    "load_data",
    "saved_activation_bytes",
]

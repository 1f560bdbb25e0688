"""leanformer: cheaper Transformers and MLP vision models to train, run and adapt.

The public API is re-exported here; see the packages `models`, `data`, `train`.
"""

from .data import DataSplit, load_data
from .models import create_model, list_models, load_checkpoint
from .train import TrainConfig, Trainer, TrainResult

__version__ = "0.1.0"
__all__ = [
    "DataSplit",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_data",
]

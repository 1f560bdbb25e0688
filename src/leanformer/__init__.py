"""leanformer: cheaper Transformers and MLP vision models to train, run and adapt.

The public API is re-exported here; see the packages `models`, `memory`, `sparsity`, `data`, `train`.
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
from .sparsity import (
    FATReLU,
    FFNSpec,
    ProSparseConfig,
    ProSparseSchedule,
    SparsityRegularizer,
    SparsityReport,
    TopK,
    apply_topk,
    find_ffns,
    inference_report,
    measure_sparsity,
    prosparse,
    relufy,
    sparsify_for_inference,
)
from .train import TrainConfig, Trainer, TrainResult

__version__ = "0.1.0"
__all__ = [
    "CompressionConfig",
    "DataSplit",
    "FATReLU",
    "FFNSpec",
    "ProSparseConfig",
    "ProSparseSchedule",
    "SavedActivationReport",
    "SparsityRegularizer",
    "SparsityReport",
    "TopK",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "apply_topk",
    "compress_activations",
    "compression_stats",
    "create_model",
    "decompress_activations",
    "find_ffns",
    "inference_report",
    "list_models",
    "load_checkpoint",
    "load_data",
    "measure_sparsity",
    "prosparse",
    "relufy",
    "saved_activation_bytes",
    "sparsify_for_inference",
]

"""leanformer: cheaper Transformers and MLP vision models to train, run and adapt.

The public API is re-exported here; see the packages `models`, `memory`, `sparsity`, `adapters`, `data`, `train`.
"""

from .adapters import (
    SMoRAConfig,
    add_smora,
    disable_adapters,
    load_adapter,
    routing_report,
    save_adapter,
)
from .data import DataSplit, TaskData, load_data, load_task
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
    load_pretrained,
    measure_sparsity,
    prosparse,
    relufy,
    save_pretrained,
    sparsify_for_inference,
)
from .train import (
    FinetuneConfig,
    FinetuneResult,
    MultiTaskClassifier,
    TrainConfig,
    Trainer,
    TrainResult,
    finetune,
    load_finetuned,
)

__version__ = "0.1.0"
__all__ = [
    "CompressionConfig",
    "DataSplit",
    "FATReLU",
    "FFNSpec",
    "FinetuneConfig",
    "FinetuneResult",
    "MultiTaskClassifier",
    "ProSparseConfig",
    "ProSparseSchedule",
    "SMoRAConfig",
    "SavedActivationReport",
    "SparsityRegularizer",
    "SparsityReport",
    "TaskData",
    "TopK",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "add_smora",
    "apply_topk",
    "compress_activations",
    "compression_stats",
    "create_model",
    "decompress_activations",
    "disable_adapters",
    "find_ffns",
    "finetune",
    "inference_report",
    "list_models",
    "load_adapter",
    "load_checkpoint",
    "load_data",
    "load_finetuned",
    "load_pretrained",
    "load_task",
    "measure_sparsity",
    "prosparse",
    "relufy",
    "routing_report",
    "save_adapter",
    "save_pretrained",
    "saved_activation_bytes",
    "sparsify_for_inference",
]

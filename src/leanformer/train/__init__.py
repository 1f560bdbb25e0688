"""The reference trainer used by `leanformer train` (loop, checkpoints/resume, torchrun/DDP), and multi-task
fine-tuning with adapters used by `leanformer finetune`."""

from ..engine.checkpoint import load_checkpoint_folder, save_checkpoint
from .config import TrainConfig
from .loop import Trainer, TrainResult
from .multitask import FinetuneConfig, FinetuneResult, MultiTaskClassifier, finetune, load_finetuned

__all__ = ["FinetuneConfig", "FinetuneResult", "MultiTaskClassifier", "TrainConfig", "TrainResult", "Trainer",
           "finetune", "load_checkpoint_folder", "load_finetuned", "save_checkpoint"]

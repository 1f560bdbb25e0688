"""The reference trainer used by `leanformer train`: loop, checkpoints/resume, torchrun/DDP."""

from .checkpoint import load_checkpoint_folder, save_checkpoint
from .config import TrainConfig
from .loop import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_checkpoint_folder", "save_checkpoint"]

"""Image classification on the training engine: the job `leanformer train` runs (`Trainer`, `TrainConfig`)."""

from .config import TrainConfig
from .loop import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer"]

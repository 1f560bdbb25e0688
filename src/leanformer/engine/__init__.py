"""The training engine every leanformer job runs on: one loop (`fit`), its checkpoints, optimiser and torchrun.

It imports no pillar; image classification (`leanformer.train`), ProSparse (`leanformer.sparsity`) and
multi-task adapter fine-tuning (`leanformer.adapters`) are built on it, and so can your own jobs.
"""

from .checkpoint import (
    CheckpointWriteError,
    NonFiniteLossError,
    load_checkpoint_folder,
    resolve_resume_folder,
    resume_run_folder,
    save_checkpoint,
)
from .distributed import DEVICES, DistContext, ShardedEpochSampler, process_group, shard
from .loop import Callback, Checkpointing, FitResult, LoopConfig, check_resume, fit, train_step
from .optim import build_optimizer, lr_at

__all__ = [
    "DEVICES",
    "Callback",
    "CheckpointWriteError",
    "Checkpointing",
    "DistContext",
    "FitResult",
    "LoopConfig",
    "NonFiniteLossError",
    "ShardedEpochSampler",
    "build_optimizer",
    "check_resume",
    "fit",
    "load_checkpoint_folder",
    "lr_at",
    "process_group",
    "resolve_resume_folder",
    "resume_run_folder",
    "save_checkpoint",
    "shard",
    "train_step",
]

"""`FinetuneConfig`: everything a multi-task fine-tuning run (`finetune`) depends on, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._checks import config_from_dict, is_int
from ..engine.optim import check_optimizer_settings
from .config import SMoRAConfig

__all__ = ["ADAPTERS", "TASK_SAMPLING", "FinetuneConfig"]

ADAPTERS = ("smora", "lora")
TASK_SAMPLING = ("proportional", "uniform")
WARMUP_FRACTION = 0.1  # default warmup: the SMoRA paper's warmup ratio


@dataclass(frozen=True)
class FinetuneConfig:
    """A multi-task fine-tuning run. Saved with every checkpoint, so a resumed run is checked to be the same run.

    adapter: "smora" or "lora" (PEFT's). r, lora_alpha, lora_dropout: both adapters; active_r, rank_partition,
        bias_update_rate, gate_scores, compute: SMoRA only (see `SMoRAConfig`, which validates them; a LoRA run
        records but does not use them).
    target_modules: the Linears to adapt, for both adapters: "all-linear", a regex matching a full module name,
        or a tuple of names (each a full name or its last components).
    steps, batch_size: optimiser steps, each on one task's batch of batch_size examples. max_length: tokens per
        example (longer ones are truncated; batches are padded to their longest example).
    lr, min_lr, warmup_steps, weight_decay, clip_grad: AdamW, linear warmup (None: a tenth of steps) then cosine
        decay to min_lr; norms of the trainable gradients clipped to clip_grad (None: no clipping).
    eval_every: measure test accuracy (and checkpoint) every this many steps, and after the last one.
    task_sampling: "proportional" (a task's share of steps is its share of the training examples) or "uniform".
    seed: the heads' and adapters' initialisation, dropout, and the batches.
    """

    adapter: str = "smora"
    r: int = 64
    active_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    rank_partition: int = 1
    bias_update_rate: float = 1e-3
    gate_scores: str = "unbiased"
    compute: str = "auto"
    target_modules: str | tuple[str, ...] = "all-linear"
    steps: int = 1000
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0
    eval_every: int = 200
    task_sampling: str = "proportional"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter={self.adapter!r}: expected one of {', '.join(ADAPTERS)}")
        if self.task_sampling not in TASK_SAMPLING:
            raise ValueError(f"task_sampling={self.task_sampling!r}: expected one of {', '.join(TASK_SAMPLING)}")
        for name in ("steps", "batch_size", "max_length", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.warmup_steps is not None and (not is_int(self.warmup_steps)
                                              or not 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected an integer in [0, steps={self.steps}] or "
                             f"None (a tenth of steps)")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        check_optimizer_settings(self.lr, self.min_lr, self.weight_decay, self.clip_grad)
        # the adapter fields are SMoRAConfig's: it validates them, and its normalised target_modules is kept
        object.__setattr__(self, "target_modules", self.smora_config().target_modules)

    def smora_config(self, modules_to_save: tuple[str, ...] = ()) -> SMoRAConfig:
        """The `SMoRAConfig` of this run (for "lora" too: its target_modules selects the Linears both adapt)."""
        return SMoRAConfig(r=self.r, active_r=self.active_r, lora_alpha=self.lora_alpha,
                           lora_dropout=self.lora_dropout, target_modules=self.target_modules,
                           rank_partition=self.rank_partition, bias_update_rate=self.bias_update_rate,
                           gate_scores=self.gate_scores, compute=self.compute, modules_to_save=modules_to_save)

    @property
    def warmup(self) -> int:
        """Warmup steps in effect: ``warmup_steps``, or a tenth of ``steps``."""
        return round(WARMUP_FRACTION * self.steps) if self.warmup_steps is None else self.warmup_steps

    def to_dict(self) -> dict:
        """JSON-able fields (target_modules as a list, as JSON gives it back)."""
        values = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        return config_from_dict(cls, values, "finetune")

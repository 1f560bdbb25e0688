"""`TrainConfig`: everything a training run depends on, validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_MODEL = "swin_nano_patch2_window4_32"
COMPRESS_CHOICES = ("none", "int8", "int4", "int2")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Saved with every checkpoint, so `--resume` continues the same run.

    `batch_size` is the global batch: with N processes each takes batch_size / N, so results do not
    depend on how many processes share the work.
    """

    model: str = DEFAULT_MODEL
    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 5.0
    img_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 0
    compress: str = "none"
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_int = ("epochs", "batch_size")
        for name in positive_int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r}: expected a number >= 0")
        if self.lr == 0:
            raise ValueError("lr=0: expected a positive learning rate")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr}: expected at most lr={self.lr}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing={self.label_smoothing}: expected a number in [0, 1)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad={self.clip_grad}: expected a positive number or None (no clipping)")
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 1):
            raise ValueError(f"img_size={self.img_size!r}: expected a positive integer or None (the data's size)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}: expected a number strictly between 0 and 1")
        if self.compress not in COMPRESS_CHOICES:
            raise ValueError(f"compress={self.compress!r}: expected one of {', '.join(COMPRESS_CHOICES)}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers={self.workers!r}: expected an integer >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return config_from_dict(cls, values, "training")


def config_from_dict(cls: type, values: dict, what: str):
    """``cls(**values)`` for a config dataclass, refusing unknown keys by name (e.g. from a newer checkpoint)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} config field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)

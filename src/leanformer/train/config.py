"""`TrainConfig`: everything a training run depends on, validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._checks import check_int, check_real, config_from_dict
from ..engine.optim import check_optimizer_settings

DEFAULT_MODEL = "swin_nano_patch2_window4_32"


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
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a string")
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_optimizer_settings(self.lr, self.min_lr, self.weight_decay, self.clip_grad)
        check_real("warmup_epochs", self.warmup_epochs, minimum=0)
        check_real("label_smoothing", self.label_smoothing, minimum=0, maximum=1, max_open=True)
        check_int("img_size", self.img_size, minimum=1, none="the data's size")
        check_real("val_fraction", self.val_fraction, minimum=0, maximum=1, min_open=True, max_open=True)
        check_int("seed", self.seed)
        check_int("workers", self.workers, minimum=0)
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs={self.model_kwargs!r}: expected a dict of constructor arguments")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return config_from_dict(cls, values, "training")


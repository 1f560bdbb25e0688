"""Image classification on the training engine: what `leanformer train` runs.

`Trainer(config).fit()` builds the data and model, trains them with `leanformer.engine.fit` (AdamW, warmup +
cosine, label smoothing, gradient clipping), evaluates every epoch, checkpoints `last/` and `best/` and can
resume exactly. It holds its output folder's lock while it runs, refuses a folder holding another run unless
told to overwrite it, and stops at the first non-finite loss, keeping the last good checkpoint. Under torchrun
each process reads its shard of every global batch (`ShardedEpochSampler`). Two extension points let the other
pillars plug in without touching the job:

- `transforms`: functions `model -> model` applied after the model is built and before the
  optimizer sees its parameters (activation compression, which `leanformer train --compress` hands in,
  ReLUfication, adapters);
- `extra_losses`: functions `(step, model) -> scalar tensor` added to the task loss after every forward
  (e.g. a sparsity regulariser whose weight follows the step); `callbacks`: `leanformer.engine.Callback`s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._io import write_json_atomic
from .._process import peak_rss_mb
from .._runfolder import claim_run_folder
from ..data import load_data
from ..engine import Callback, Checkpointing, LoopConfig, ShardedEpochSampler, fit, process_group
from ..engine.checkpoint import resolve_resume_folder, resume_run_folder
from ..engine.distributed import DistContext, sum_across_processes
from ..models import create_model
from .config import TrainConfig

ModelTransform = Callable[[nn.Module], nn.Module]
ExtraLoss = Callable[[int, nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    config: dict
    params: int
    epochs_run: int
    steps: int
    best_val_acc: float
    final_val_acc: float
    seconds: float
    seconds_per_step: float
    images_per_s: float
    peak_memory_mb: float
    saved_activation_mb: float
    saved_activation_ratio: float
    world_size: int
    rank: int
    output: str | None
    history: list[dict] = field(default_factory=list)


# fields a resumed run may change: they do not alter what has been computed so far
RESUMABLE_CHANGES = ("epochs", "workers")
# what a run leaves in its output folder: a fresh run refuses a folder holding any of them (unless overwrite)
RUN_OUTPUTS = ("last", "best", "result.json")


class Trainer:
    """overwrite: a fresh run may replace the run already in ``output`` (its last/, best/ and result.json are
    deleted first); without it such a folder is refused.

    settings: what else defines the run besides ``config``, e.g. the compression a transform applies
        (``{"compress": "int8"}`` from `leanformer train --compress`): recorded with ``config`` in every checkpoint
        and in the result, and checked on resume like it.
    activation_meter: ``f(model)`` -> a context manager whose value reports ``stored_bytes`` and ``ratio`` after
        the block, such as `leanformer.saved_activation_bytes`: it measures what the first training step keeps
        for backward (``TrainResult.saved_activation_mb`` / ``_ratio``; 0 and 1 without one).
    """

    def __init__(
        self,
        config: TrainConfig,
        output: str | Path | None = None,
        transforms: Sequence[ModelTransform] = (),
        extra_losses: Sequence[ExtraLoss] = (),
        progress: bool = True,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        settings: Mapping[str, object] | None = None,
        activation_meter: Callable[[nn.Module], AbstractContextManager] | None = None,
        device: str = "auto",
    ):
        self.config = config
        self.device = device  # where to train ("auto", "cpu", "cuda"): not part of the run's identity
        self.settings, self.activation_meter = dict(settings or {}), activation_meter
        overlap = sorted(set(self.settings) & set(config.to_dict()))
        if overlap:
            raise ValueError(f"settings {overlap} are TrainConfig fields: set them in the config")
        self.output = Path(output) if output is not None else None
        self.transforms, self.extra_losses, self.callbacks = list(transforms), list(extra_losses), list(callbacks)
        self.progress = progress
        self.overwrite = overwrite
        self.activations = None  # saved-activation accounting of the run's first training step
        self.model: nn.Module | None = None  # the trained model, after fit

    def fit(self, resume: str | Path | None = None) -> TrainResult:
        with process_group(self.device) as ctx, self._claim_output(ctx, resume):
            return self._fit(ctx, resume)

    def _claim_output(self, ctx: DistContext, resume: str | Path | None):
        """The output folder's lock, held by the process that writes it (rank 0); resuming into it keeps its run."""
        if self.output is None or not ctx.is_main:
            return claim_run_folder(None, RUN_OUTPUTS)
        here = resume is not None and resume_run_folder(resume).resolve() == self.output.resolve()
        return claim_run_folder(self.output, RUN_OUTPUTS, resume=here, overwrite=self.overwrite)

    def _identity(self) -> dict:
        """The run's configuration as checkpoints and the result record it: ``config`` and ``settings``."""
        return {**self.config.to_dict(), **self.settings}

    # -- building -----------------------------------------------------------------------------

    def _build(self, ctx: DistContext):
        cfg = self.config
        data = load_data(cfg.data, img_size=cfg.img_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, in_chans=data.in_chans, num_classes=data.num_classes,
                             img_size=data.img_size, **cfg.model_kwargs)
        for transform in self.transforms:
            model = transform(model)
        model.to(ctx.device)
        steps_per_epoch = len(data.train) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(data.train)} images)")
        train_sampler = ShardedEpochSampler(len(data.train), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
        val_sampler = ShardedEpochSampler(len(data.val), cfg.batch_size, ctx.rank, ctx.world_size, shuffle=False,
                                          drop_last=False)
        local_batch = cfg.batch_size // ctx.world_size
        train_loader = DataLoader(data.train, batch_size=local_batch, sampler=train_sampler, num_workers=cfg.workers)
        val_loader = DataLoader(data.val, batch_size=local_batch, sampler=val_sampler, num_workers=cfg.workers)
        return data, model, train_loader, val_loader, steps_per_epoch

    # -- the job on the engine ----------------------------------------------------------------

    def _fit(self, ctx: DistContext, resume: str | Path | None) -> TrainResult:
        cfg = self.config
        data, model, train_loader, val_loader, steps_per_epoch = self._build(ctx)
        loss = _ClassificationLoss(cfg.label_smoothing, model, self.activation_meter)
        epochs = _EpochRecord(steps_per_epoch, cfg.epochs)

        def batches(start: int):
            for epoch in range(start // steps_per_epoch, cfg.epochs):
                train_loader.sampler.set_epoch(epoch)
                for images, labels in train_loader:
                    yield images.to(ctx.device), labels.to(ctx.device)

        def evaluate(model: nn.Module) -> dict:
            val_loss, val_acc = _evaluate(model, val_loader, ctx)
            return {"epoch": epochs.completed(), "train_acc": loss.take_accuracy(ctx), "val_loss": val_loss,
                    "val_acc": val_acc}

        last, best = (None, None) if self.output is None else (self.output / "last", self.output / "best")
        checkpoint = Checkpointing(last, self._identity(), RESUMABLE_CHANGES, extra=epochs.meta, best_folder=best,
                                   best_metric=None if best is None else "val_acc")
        loop = LoopConfig(steps=cfg.epochs * steps_per_epoch, lr=cfg.lr, min_lr=cfg.min_lr,
                          warmup_steps=min(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch),
                          weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad, eval_every=steps_per_epoch,
                          desc="train")
        done = fit(model, batches, loss, loop, evaluate=evaluate, extra_losses=self.extra_losses,
                   callbacks=[epochs, *self.callbacks], checkpoint=checkpoint,
                   resume=False if resume is None else resolve_resume_folder(resume),
                   shard_batches=False, progress=self.progress)
        self.activations, self.model = loss.activations, model
        history = done.history
        steps_run = done.step - done.start_step
        images = steps_run * cfg.batch_size
        result = TrainResult(
            config=self._identity(), params=sum(p.numel() for p in model.parameters()),
            epochs_run=steps_run // steps_per_epoch, steps=done.step,
            best_val_acc=max((entry["val_acc"] for entry in history), default=0.0),
            final_val_acc=history[-1]["val_acc"] if history else 0.0, seconds=done.seconds,
            seconds_per_step=done.seconds / steps_run if steps_run else 0.0,
            images_per_s=images / done.seconds if done.seconds else 0.0, peak_memory_mb=peak_rss_mb(),
            saved_activation_mb=self.activations.stored_bytes / 2**20 if self.activations else 0.0,
            saved_activation_ratio=self.activations.ratio if self.activations else 1.0,
            world_size=ctx.world_size, rank=ctx.rank, output=str(self.output) if self.output else None,
            history=history,
        )
        if ctx.is_main and self.output is not None:
            write_json_atomic(self.output / "result.json", result.__dict__)
        return result


class _ClassificationLoss:
    """Cross-entropy with label smoothing; counts training accuracy between evaluations, and measures what the
    run's first step keeps for backward with the Trainer's ``activation_meter``."""

    def __init__(self, label_smoothing: float, model: nn.Module, meter: Callable | None):
        self.label_smoothing, self.model, self.meter = label_smoothing, model, meter
        self.correct = self.seen = 0.0
        self.activations = None

    def __call__(self, net: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        if self.meter is not None and self.activations is None:
            with self.meter(self.model) as self.activations:
                logits = net(images)
        else:
            logits = net(images)
        self.correct += float((logits.argmax(1) == labels).sum())
        self.seen += len(labels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def take_accuracy(self, ctx: DistContext) -> float:
        correct, seen = sum_across_processes([self.correct, self.seen], ctx)
        self.correct = self.seen = 0.0
        return correct / seen if seen else 0.0


class _EpochRecord(Callback):
    """Epochs on the engine's steps: the checkpoint's ``epoch`` and ``best_val_acc`` fields, and the check that
    a resumed run starts at the end of an epoch and does not go backwards."""

    def __init__(self, steps_per_epoch: int, epochs: int):
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.step, self.best = 0, 0.0

    def check_start(self, step: int) -> None:
        epoch = step // self.steps_per_epoch
        if step % self.steps_per_epoch:
            raise ValueError(f"checkpoint at step {step}: not the end of an epoch of {self.steps_per_epoch} steps")
        if epoch > self.epochs:
            raise ValueError(f"epochs={self.epochs}: the checkpoint has already completed {epoch} epochs; "
                             f"give at least --epochs {epoch}")

    def completed(self) -> int:
        return self.step // self.steps_per_epoch

    def on_step(self, step: int, model: nn.Module, batch, loss: float) -> None:
        self.step = step

    def on_eval(self, step: int, model: nn.Module, entry: dict) -> None:
        self.best = max(self.best, entry["val_acc"])

    def on_resume(self, meta: dict, model: nn.Module) -> None:
        self.check_start(meta["step"])
        self.step = meta["step"]
        self.best = max((entry["val_acc"] for entry in meta["history"]), default=0.0)

    def meta(self) -> dict:
        return {"epoch": self.completed(), "best_val_acc": self.best}


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext) -> tuple[float, float]:
    """(loss, accuracy) over this process's shard of the validation set, summed over all processes."""
    loss_sum = correct = seen = 0.0
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        seen += len(labels)
    loss_sum, correct, seen = sum_across_processes([loss_sum, correct, seen], ctx)
    return loss_sum / seen, correct / seen

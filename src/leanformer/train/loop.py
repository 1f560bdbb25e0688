"""The reference training loop the CLI runs: small enough to read in one sitting.

`Trainer(config).fit()` builds the data and model, trains with AdamW (warmup + cosine, label
smoothing, gradient clipping), evaluates every epoch, checkpoints `last/` and `best/` and can
resume exactly. It holds its output folder's lock while it runs, refuses a folder holding another
run unless told to overwrite it, and stops at the first non-finite loss, keeping the last good
checkpoint. Two explicit extension points let the other pillars plug in without touching the
loop:

- `transforms`: functions `model -> model` applied after the model is built and before the
  optimizer sees its parameters (activation compression, ReLUfication, adapters);
- `extra_losses`: functions `model -> scalar tensor` added to the task loss after every forward
  (e.g. a sparsity regulariser).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._io import write_json_atomic
from .._process import peak_rss_mb
from .._runfolder import claim_run_folder
from ..data import load_data
from ..memory import CompressionConfig, compress_activations, saved_activation_bytes
from ..models import create_model
from .checkpoint import (
    check_finite_loss,
    check_same_run,
    load_checkpoint_folder,
    resolve_resume_folder,
    restore_training_state,
    resume_run_folder,
    save_checkpoint,
    training_state_tensors,
)
from .config import TrainConfig
from .distributed import DistContext, ShardedEpochSampler, init_distributed, shutdown_distributed, sum_across_processes
from .optim import build_optimizer, lr_at, set_lr

ModelTransform = Callable[[nn.Module], nn.Module]
ExtraLoss = Callable[[nn.Module], torch.Tensor]


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
# meta.json fields a resumed run reads
RESUME_FIELDS = ("epoch", "best_val_acc", "history", "config")


class Trainer:
    """overwrite: a fresh run may replace the run already in ``output`` (its last/, best/ and result.json are
    deleted first); without it such a folder is refused."""

    def __init__(
        self,
        config: TrainConfig,
        output: str | Path | None = None,
        transforms: Sequence[ModelTransform] = (),
        extra_losses: Sequence[ExtraLoss] = (),
        progress: bool = True,
        overwrite: bool = False,
    ):
        self.config = config
        self.output = Path(output) if output is not None else None
        self.transforms, self.extra_losses = list(transforms), list(extra_losses)
        self.progress = progress
        self.overwrite = overwrite
        self.activations = None  # saved-activation accounting of the run's first training step

    def fit(self, resume: str | Path | None = None) -> TrainResult:
        ctx = init_distributed()
        try:
            with self._claim_output(ctx, resume):
                return self._fit(ctx, resume)
        finally:
            shutdown_distributed(ctx)

    def _claim_output(self, ctx: DistContext, resume: str | Path | None):
        """The output folder's lock, held by the process that writes it (rank 0); resuming into it keeps its run."""
        if self.output is None or not ctx.is_main:
            return claim_run_folder(None, RUN_OUTPUTS)
        here = resume is not None and resume_run_folder(resume).resolve() == self.output.resolve()
        return claim_run_folder(self.output, RUN_OUTPUTS, resume=here, overwrite=self.overwrite)

    # -- building -----------------------------------------------------------------------------

    def _build(self, ctx: DistContext):
        cfg = self.config
        data = load_data(cfg.data, img_size=cfg.img_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, in_chans=data.in_chans, num_classes=data.num_classes,
                             img_size=data.img_size, **cfg.model_kwargs)
        compression = CompressionConfig.from_name(cfg.compress)
        if compression is not None:
            model = compress_activations(model, compression)
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

    # -- the loop -----------------------------------------------------------------------------

    def _fit(self, ctx: DistContext, resume: str | Path | None) -> TrainResult:
        cfg = self.config
        data, model, train_loader, val_loader, steps_per_epoch = self._build(ctx)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        start_epoch, step, best_acc, history = 0, 0, 0.0, []
        if resume is not None:
            tensors, meta = load_checkpoint_folder(resolve_resume_folder(resume), require=RESUME_FIELDS)
            check_same_run(meta["config"], cfg.to_dict(), RESUMABLE_CHANGES)
            self._check_resumed_position(meta, steps_per_epoch)
            restore_training_state(model, optimizer, tensors, meta["param_groups"])
            start_epoch, step, best_acc, history = meta["epoch"], meta["step"], meta["best_val_acc"], meta["history"]
        net = DistributedDataParallel(model) if ctx.enabled else model
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        train_seconds, train_steps, val_acc = 0.0, 0, history[-1]["val_acc"] if history else 0.0
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            stats = self._train_epoch(net, model, optimizer, train_loader, ctx, epoch, step, total_steps, warmup_steps)
            train_seconds += time.perf_counter() - started
            step += steps_per_epoch
            train_steps += steps_per_epoch
            val_loss, val_acc = self._evaluate(net, val_loader, ctx)
            history.append({"epoch": epoch + 1, "step": step, **stats, "val_loss": val_loss, "val_acc": val_acc})
            improved = val_acc > best_acc
            best_acc = max(best_acc, val_acc)
            if ctx.is_main and self.output is not None:
                self._save(model, optimizer, epoch + 1, step, best_acc, history, improved)
            if ctx.is_main and self.progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f} "
                      f"acc {stats['train_acc']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
                      f"{' (best)' if improved else ''}", file=sys.stderr)
        images = train_steps * cfg.batch_size
        result = TrainResult(
            config=cfg.to_dict(), params=sum(p.numel() for p in model.parameters()),
            epochs_run=cfg.epochs - start_epoch,
            steps=step, best_val_acc=best_acc, final_val_acc=val_acc, seconds=round(train_seconds, 3),
            seconds_per_step=train_seconds / train_steps if train_steps else 0.0,
            images_per_s=images / train_seconds if train_seconds else 0.0, peak_memory_mb=peak_rss_mb(),
            saved_activation_mb=self.activations.stored_bytes / 2**20 if self.activations else 0.0,
            saved_activation_ratio=self.activations.ratio if self.activations else 1.0,
            world_size=ctx.world_size, rank=ctx.rank, output=str(self.output) if self.output else None,
            history=history,
        )
        if ctx.is_main and self.output is not None:
            write_json_atomic(self.output / "result.json", result.__dict__)
        return result

    def _train_epoch(self, net, model, optimizer, loader, ctx, epoch, step, total_steps, warmup_steps) -> dict:
        cfg = self.config
        net.train()
        loss_sum = correct = seen = 0.0
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=not (ctx.is_main and self.progress), file=sys.stderr)
        started = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            set_lr(optimizer, lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr))
            if self.activations is None:  # measure what the first step keeps for backward
                with saved_activation_bytes(model) as self.activations:
                    logits = net(images)
            else:
                logits = net(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            total = loss + sum((extra(model) for extra in self.extra_losses), torch.zeros((), device=ctx.device))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            check_finite_loss(total.item(), step, None if self.output is None else self.output / "last")
            loss_sum += loss.item() * len(labels)
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * ctx.world_size / (time.perf_counter() - started):.0f}")
        bar.close()
        loss_sum, correct, seen = sum_across_processes([loss_sum, correct, seen], ctx)
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen}

    def _check_resumed_position(self, meta: dict, steps_per_epoch: int) -> None:
        """A resumed run goes forward from where its checkpoint is, which must be the end of an epoch."""
        epoch, step = meta["epoch"], meta["step"]
        if epoch > self.config.epochs:
            raise ValueError(f"epochs={self.config.epochs}: the checkpoint has already completed {epoch} epochs; "
                             f"give at least --epochs {epoch}")
        if step != epoch * steps_per_epoch or len(meta["history"]) != epoch:
            raise ValueError(f"checkpoint of epoch {epoch}: step {step} and {len(meta['history'])} history entries "
                             f"do not match {epoch} epochs of {steps_per_epoch} steps")

    @torch.no_grad()
    def _evaluate(self, net, loader, ctx) -> tuple[float, float]:
        net.eval()
        loss_sum = correct = seen = 0.0
        for images, labels in loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            logits = net(images)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
        loss_sum, correct, seen = sum_across_processes([loss_sum, correct, seen], ctx)
        return loss_sum / seen, correct / seen

    def _save(self, model, optimizer, epoch, step, best_acc, history, improved) -> None:
        tensors, param_groups = training_state_tensors(model, optimizer)
        meta = {"epoch": epoch, "step": step, "best_val_acc": best_acc, "history": history,
                "config": self.config.to_dict(), "param_groups": param_groups}
        save_checkpoint(self.output / "last", tensors, meta)
        if improved:
            save_checkpoint(self.output / "best", tensors, meta)

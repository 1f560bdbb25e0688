"""The one training loop every leanformer job runs on: `fit(model, batches, loss_fn, LoopConfig(...))`.

Image classification (`leanformer train`), ProSparse (`leanformer sparsify`), multi-task adapter fine-tuning
(`leanformer finetune`) and your own jobs share it, so each gets the same guarantees:

- AdamW with Swin's weight-decay exclusions (or an optimiser you pass), linear warmup then cosine decay, set
  from the step counter alone; gradient accumulation; gradient clipping over the trainable parameters;
- extra losses that get the step (a sparsity penalty whose λ follows a schedule) and callbacks
  (`Callback.on_step`, `on_eval`, `on_epoch_end`, `on_resume`) that see the model but never the loop's state;
- evaluation every ``eval_every`` steps and after the last, each entry added to the history;
- atomic checkpoints (`Checkpointing`): model, optimiser moments and RNG, written after each evaluation, resumed
  exactly (the batches already used are skipped, the configuration checked to be the same run's);
- a stop at the first non-finite loss, naming the checkpoint kept; a progress bar;
- torchrun: under ``WORLD_SIZE`` > 1 the model is wrapped in DistributedDataParallel and each process takes
  its slice of every global batch (or its own batches, ``shard_batches=False``), so N processes train as one.

The engine imports no pillar: the jobs built on it live in theirs.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .._checks import check_int, is_int
from .._io import dumps_json
from .._runfolder import claim_run_folder
from .checkpoint import (
    check_finite_loss,
    check_same_run,
    load_checkpoint_folder,
    restore_training_state,
    save_checkpoint,
    training_state_tensors,
)
from .distributed import DistContext, process_group, shard, sum_across_processes
from .optim import build_optimizer, check_optimizer_settings, lr_at, set_lr

__all__ = ["Callback", "Checkpointing", "FitResult", "LoopConfig", "check_resume", "fit", "train_step"]

LossFn = Callable[[nn.Module, object], torch.Tensor]
ExtraLoss = Callable[[int, nn.Module], torch.Tensor]
TIMING_SKIP = 3  # first steps of a session left out of the median step time (allocator and kernel warm-up)


@dataclass(frozen=True)
class LoopConfig:
    """How `fit` trains: ``steps`` optimiser steps, each over ``accumulate`` batches; AdamW at ``lr`` with
    ``warmup_steps`` of linear warmup then cosine decay to ``min_lr``; gradient norms clipped to ``clip_grad``
    (None: not clipped); evaluation (and a checkpoint) every ``eval_every`` steps and after the last (None:
    after the last only); ``steps_per_epoch`` makes `Callback.on_epoch_end` fire; ``desc`` labels the bar."""

    steps: int
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float | None = None
    accumulate: int = 1
    eval_every: int | None = None
    steps_per_epoch: int | None = None
    desc: str = "train"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, minimum=1)
        check_optimizer_settings(self.lr, self.min_lr, self.weight_decay, self.clip_grad)
        if not is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected an integer in [0, steps={self.steps}]")
        check_int("accumulate", self.accumulate, minimum=1)
        check_int("eval_every", self.eval_every, minimum=1, none="after the last step only")
        check_int("steps_per_epoch", self.steps_per_epoch, minimum=1, none="no epochs")
        if not isinstance(self.desc, str):
            raise ValueError(f"desc={self.desc!r}: expected a string")


class Callback:
    """Hooks into `fit`; override the ones you need. ``model`` is the unwrapped model (not DDP's wrapper)."""

    def on_resume(self, meta: dict, model: nn.Module) -> None:
        """After a checkpoint was restored: ``meta`` is its meta.json (the fields `Checkpointing.extra` wrote)."""

    def on_step(self, step: int, model: nn.Module, batch, loss: float) -> None:
        """After optimiser step ``step`` (1-based); ``loss`` is the task loss of this process's batch."""

    def on_eval(self, step: int, model: nn.Module, entry: dict) -> None:
        """After an evaluation, before its checkpoint, in eval mode under no_grad; ``entry`` is the history entry
        (add to it here)."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After the last step of (1-based) ``epoch``, with `LoopConfig.steps_per_epoch` set."""


@dataclass(frozen=True)
class Checkpointing:
    """Where and what `fit` checkpoints after every evaluation.

    folder: where checkpoints are written (None: nowhere; the identity still guards a resume from elsewhere).
    identity: the run's configuration, saved with every checkpoint; a resumed run must give the same (fields in
        ``resumable`` may differ). trainable_only: leave out frozen parameters (a base model under an adapter,
        which the job reads again from its own files). extra: fields added to meta.json, computed at save time.
    best_folder, best_metric: also keep the checkpoint of the evaluation with the highest ``best_metric``.
    lock: hold ``folder``'s lock while `fit` runs and refuse a folder holding another run's checkpoint unless
        resuming it (False: the job already holds it).
    """

    folder: Path | None
    identity: Mapping
    resumable: tuple[str, ...] = ()
    trainable_only: bool = False
    extra: Callable[[], dict] | None = None
    best_folder: Path | None = None
    best_metric: str | None = None
    lock: bool = True

    def __post_init__(self) -> None:
        if self.folder is not None:
            object.__setattr__(self, "folder", Path(self.folder))
        # as a resumed run reads it back from meta.json: tuples become lists, so the two compare equal
        object.__setattr__(self, "identity", json.loads(dumps_json(dict(self.identity))))
        if (self.best_folder is None) != (self.best_metric is None):
            raise ValueError("best_folder and best_metric go together: give both or neither")


@dataclass
class FitResult:
    """What `fit` did: ``step`` reached, ``start_step`` (above 0 when resumed), the evaluation ``history``,
    ``seconds`` of training in this session (evaluations excluded) and its median ``seconds_per_step``."""

    step: int
    start_step: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float | None = None


def check_resume(folder: Path | None, resume: bool, what: str) -> None:
    """The precondition of resuming, in one place: a folder holding a checkpoint (meta.json)."""
    if not resume:
        return
    if folder is None:
        raise ValueError(f"resume needs {what}, the folder of the run to continue")
    if not (Path(folder) / "meta.json").is_file():
        raise ValueError(f"resume: no checkpoint in {folder}")


def fit(model: nn.Module, batches: Iterable | Callable[[int], Iterable], loss_fn: LossFn, config: LoopConfig, *,
        evaluate: Callable[[nn.Module], dict] | None = None, extra_losses: Sequence[ExtraLoss] = (),
        callbacks: Sequence[Callback] = (), checkpoint: Checkpointing | None = None,
        resume: bool | str | Path = False,
        optimizer: torch.optim.Optimizer | None = None, shard_batches: bool = True,
        find_unused_parameters: bool = False, distributed: bool = True, progress: bool = True) -> FitResult:
    """Train ``model`` in place for ``config.steps`` optimiser steps; return what was done.

    batches: global batches, at least ``steps * accumulate`` of them; or a function of the step to start from
        that returns them from there (so a resumed job need not read the batches it skips). loss_fn:
        ``f(model, batch) -> mean loss`` (``model`` is DDP's wrapper under torchrun: call it, not its parts).
    evaluate: ``f(model) -> dict`` of figures for the history (the model is in eval mode and back in train mode
        after); extra_losses: ``f(step, model) -> tensor`` added to the loss (0-based step), not to the logged
        train_loss. optimizer: default AdamW over the trainable parameters (`build_optimizer`).
    checkpoint, resume: see `Checkpointing`; ``resume=True`` restores the checkpoint in ``checkpoint.folder``, a
        path the one there (a run continued into another folder); either needs ``checkpoint`` for the identity.
    shard_batches: each process takes its slice of each global batch (`shard`); False when the batches are
        already this process's (a DataLoader with a sharding sampler). find_unused_parameters: for models whose
        steps use only some parameters (one task head per batch), as DistributedDataParallel takes it.
        distributed: False trains in this process alone even under torchrun (a small model fitted on data the
        process already holds, such as one FFN's predictor).
    """
    if resume is not False and resume is not None and checkpoint is None:
        raise ValueError("resume needs checkpoint=Checkpointing(...): its identity says which run may continue")
    source = checkpoint.folder if resume is True else (Path(resume) if resume else None)
    check_resume(source, bool(resume), "Checkpointing.folder")
    writes = checkpoint.folder if checkpoint is not None and checkpoint.lock else None
    same = writes is not None and source is not None and source.resolve() == writes.resolve()
    with process_group() if distributed else nullcontext(DistContext()) as ctx, \
            claim_run_folder(writes if ctx.is_main else None, ("meta.json",), resume=same):
        return _Loop(model, loss_fn, config, evaluate, list(extra_losses), list(callbacks), checkpoint, optimizer,
                     ctx, progress).run(batches, source, shard_batches, find_unused_parameters)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batches: Sequence, *,
               lr: float, clip_grad: float | None = None, params: Sequence[nn.Parameter] | None = None,
               extra_loss: Callable[[], torch.Tensor] | None = None) -> tuple[float, float]:
    """One optimiser step at ``lr`` over the micro-batches ``batches`` (their gradients averaged), the gradient
    norm of ``params`` (default: the optimiser's) clipped to ``clip_grad``; ``extra_loss()`` is added to each
    micro-batch's loss. Returns (mean task loss, mean total loss); a non-finite total is returned without
    applying the update. This is `fit`'s step, callable on its own (to time one step as `fit` runs it)."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = total_sum = 0.0
    for batch in batches:
        loss = loss_fn(model, batch)
        total = loss if extra_loss is None else loss + extra_loss().to(loss.device)
        (total / len(batches)).backward()
        loss_sum, total_sum = loss_sum + loss.item(), total_sum + total.item()
    if not math.isfinite(total_sum):
        return loss_sum / len(batches), total_sum / len(batches)
    if clip_grad is not None:
        params = params if params is not None else [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    return loss_sum / len(batches), total_sum / len(batches)


class _Loop:
    """The state of one `fit` call; its methods are the parts of the loop."""

    def __init__(self, model, loss_fn, config, evaluate, extra_losses, callbacks, checkpoint, optimizer, ctx,
                 progress):
        self.model, self.loss_fn, self.config, self.evaluate = model, loss_fn, config, evaluate
        self.extra_losses, self.callbacks, self.checkpoint, self.ctx = extra_losses, callbacks, checkpoint, ctx
        self.progress = progress and ctx.is_main
        self.optimizer = optimizer or build_optimizer(model, config.lr, config.weight_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step, self.history, self.best = 0, [], -math.inf

    def run(self, batches, resume_from: Path | None, shard_batches: bool, find_unused: bool) -> FitResult:
        if resume_from is not None:
            self._restore(resume_from)
        start = self.step
        source = self._batches(batches, start, shard_batches)
        net = (DistributedDataParallel(self.model, find_unused_parameters=find_unused) if self.ctx.enabled
               else self.model)
        bar = tqdm(total=self.config.steps, initial=start, desc=self.config.desc, unit="step", leave=False,
                   disable=not self.progress, file=sys.stderr)
        durations, losses = [], []
        try:
            self.model.train()
            while self.step < self.config.steps:
                started = time.perf_counter()
                loss, lr, last_batch = self._optimizer_step(net, source)
                durations.append(time.perf_counter() - started)
                self.step += 1
                losses.append(loss)
                for callback in self.callbacks:
                    callback.on_step(self.step, self.model, last_batch, loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                if self.config.steps_per_epoch and self.step % self.config.steps_per_epoch == 0:
                    for callback in self.callbacks:
                        callback.on_epoch_end(self.step // self.config.steps_per_epoch, self.model)
                if self._evaluation_due():
                    self._evaluate(lr, losses, bar)
                    losses = []
        finally:
            bar.close()
        timed = durations[TIMING_SKIP:] or durations
        return FitResult(step=self.step, start_step=start, history=self.history, seconds=round(sum(durations), 3),
                         seconds_per_step=statistics.median(timed) if timed else None)

    def _batches(self, batches, start: int, shard_batches: bool) -> Iterator:
        skip = start * self.config.accumulate
        if callable(batches):
            source = iter(batches(start))
        else:
            source = iter(batches)
            for used in range(skip):  # resuming: draw the batches the checkpointed steps trained on
                if next(source, None) is None:
                    raise ValueError(f"the batches ran out after {used} while skipping the {skip} already used")
        if shard_batches and self.ctx.enabled:
            return (shard(batch, self.ctx.rank, self.ctx.world_size) for batch in source)
        return source

    def _optimizer_step(self, net: nn.Module, source: Iterator) -> tuple[float, float, object]:
        """One optimiser step over ``accumulate`` batches; (mean task loss, learning rate, the last batch)."""
        config = self.config
        lr = lr_at(self.step, config.steps, config.warmup_steps, config.lr, config.min_lr)
        batches = []
        for micro in range(config.accumulate):
            batch = next(source, None)
            if batch is None:
                used = self.step * config.accumulate + micro
                raise ValueError(f"the batches ran out after {used} batches; {config.steps} steps x {config.accumulate}"
                                 f" need {config.steps * config.accumulate} (an endless iterator such as lm_batches "
                                 "gives as many)")
            batches.append(batch)
        step = self.step
        extra = (lambda: sum((f(step, self.model) for f in self.extra_losses), torch.zeros(()))) \
            if self.extra_losses else None
        loss, total = train_step(net, self.optimizer, self.loss_fn, batches, lr=lr, clip_grad=config.clip_grad,
                                 params=self.params, extra_loss=extra)
        # a NaN penalty stops the run as a NaN task loss does: after it every update is NaN
        check_finite_loss(total, self.step + 1, self.checkpoint and self.checkpoint.folder)
        return loss, lr, batches[-1]

    def _evaluation_due(self) -> bool:
        every = self.config.eval_every
        return self.step == self.config.steps or (every is not None and self.step % every == 0)

    def _evaluate(self, lr: float, losses: list[float], bar) -> None:
        mean_loss = sum_across_processes([sum(losses), len(losses)], self.ctx)
        entry = {"step": self.step, "lr": lr, "train_loss": mean_loss[0] / mean_loss[1]}
        self.model.eval()
        with torch.no_grad():
            if self.evaluate is not None:
                entry.update(self.evaluate(self.model))
            for callback in self.callbacks:
                callback.on_eval(self.step, self.model, entry)
        self.model.train()
        self.history.append(entry)
        if self.progress:
            bar.write(f"{self.config.desc} step {self.step}/{self.config.steps}: {_figures(entry)}", file=sys.stderr)
        if self.checkpoint is not None and self.checkpoint.folder is not None and self.ctx.is_main:
            self._save(entry)

    def _save(self, entry: dict) -> None:
        checkpoint = self.checkpoint
        tensors, param_groups = training_state_tensors(self.model, self.optimizer, checkpoint.trainable_only)
        meta = {"step": self.step, "history": self.history, "config": checkpoint.identity,
                "param_groups": param_groups, **(checkpoint.extra() if checkpoint.extra else {})}
        save_checkpoint(checkpoint.folder, tensors, meta)
        if checkpoint.best_metric is not None and entry.get(checkpoint.best_metric, -math.inf) > self.best:
            self.best = entry[checkpoint.best_metric]
            save_checkpoint(checkpoint.best_folder, tensors, meta)

    def _restore(self, folder: Path) -> None:
        checkpoint = self.checkpoint
        tensors, meta = load_checkpoint_folder(folder, require=("config", "history"))
        check_same_run(meta["config"], checkpoint.identity, checkpoint.resumable)
        restore_training_state(self.model, self.optimizer, tensors, meta["param_groups"])
        self.step, self.history = meta["step"], meta["history"]
        if checkpoint.best_metric is not None:
            self.best = max((entry.get(checkpoint.best_metric, -math.inf) for entry in self.history),
                            default=-math.inf)
        for callback in self.callbacks:  # a job's own checks of the checkpoint come first: they know its units
            callback.on_resume(meta, self.model)
        if self.step > self.config.steps:
            raise ValueError(f"steps={self.config.steps}: the checkpoint in {folder} is at step {self.step} already")


def _figures(entry: dict) -> str:
    """The numbers of a history entry on one line: floats, and the floats of a dict one level down."""
    parts = []
    for key, value in entry.items():
        if key == "lr":
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, dict) and key not in ("step", "lr"):
            parts.extend(f"{key}[{k}] {v:.4g}" for k, v in value.items() if isinstance(v, float))
    return "  ".join(parts)

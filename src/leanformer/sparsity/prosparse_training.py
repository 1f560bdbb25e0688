"""ProSparse end to end: ReLU substitution, progressive sparsity regularisation, FATReLU.

ProSparse (Song et al., "ProSparse: Introducing and Enhancing Intrinsic Activation Sparsity within Large
Language Models", 2024) turns a model whose FFNs use a smooth activation (LLaMA's SiLU gate, GELU) into one
whose FFN intermediate activations x₁ are mostly exact zeros, in three steps:

1. replace the FFN activation with ReLU and continue training without regularisation (λ = 0);
2. keep training with λ·Σ_layers ‖x₁‖₁ added to the loss, λ raised stage by stage along sine curves
   (`ProSparseSchedule`; the paper's LLaMA2-7B table by default, scaled to the run);
3. replace ReLU with FATReLU(t), which also zeroes the weak positive activations below t (t = 0.01).

`prosparse(model, train_batches, config, eval_batches)` runs the three steps in place with AdamW (warmup +
cosine learning rate), evaluates loss and sparsity every `eval_every` steps, and can checkpoint and resume
exactly. The task loss is chosen by model class from `TASK_LOSSES`: next-token cross-entropy for Hugging Face
causal LMs, classification cross-entropy for image backbones; other models pass `loss_fn`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import config_from_dict, is_int, is_real
from .._runfolder import claim_run_folder
from ..engine import Checkpointing, LoopConfig, check_resume, fit, process_group
from ..engine.optim import check_optimizer_settings
from ._batches import split_batch, split_pair, to_device
from .activations import ReLUConfig, relufy
from .ffn import FFNSpec
from .measure import SparsityReport, measure_sparsity
from .regularize import NORMALIZATIONS, PROSPARSE_7B, ProSparseSchedule, SparsityRegularizer

__all__ = ["TASK_LOSSES", "ProSparseConfig", "ProSparseResult", "causal_lm_loss", "classification_loss", "model_loss",
           "prosparse", "task_loss_for"]

Batch = tuple[torch.Tensor, torch.Tensor]
TaskLoss = Callable[[nn.Module, Batch], torch.Tensor]

# the 7B table split into its ReLU-only phase and the regularisation stages after it (end steps relative to it)
_7B_RELU_STEPS = PROSPARSE_7B[0][0]
_7B_REGULARIZATION = tuple((end - _7B_RELU_STEPS, lam) for end, lam in PROSPARSE_7B[1:])


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM; batch = (input ids or a dict of keyword inputs,
    target ids (B, L) already shifted, as `lm_batches` gives them; -100 is ignored)."""
    call = split_batch(batch)
    logits = call.run(model, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, -2).float(), call.targets.flatten())


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of an image classifier returning logits; batch = (images, labels)."""
    call = split_batch(batch)
    return F.cross_entropy(call.run(model), call.targets)


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss the model computes itself from ``labels`` (every Hugging Face task model: masked LM, sequence or
    image classification, seq2seq); batch = (inputs, labels), the labels as that model expects them."""
    call = split_batch(batch)
    output = call.run(model, labels=call.targets)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for the labels; pass loss_fn=f where "
                         "f(model, (inputs, targets)) returns the mean loss")
    return loss


# model class name -> its task loss, for models that compute none themselves (see `task_loss_for` for the rest)
TASK_LOSSES: dict[str, TaskLoss] = {
    "SwinTransformer": classification_loss,  # ours and timm's
    "MSMLP": classification_loss,
    "VisionTransformer": classification_loss,  # timm
}


def _is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (LlamaForCausalLM, GPT2LMHeadModel, ...): its own loss would shift the targets
    that `lm_batches` already shifted, so `causal_lm_loss` is used instead."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def task_loss_for(model: nn.Module) -> TaskLoss:
    """``model``'s task loss: `TASK_LOSSES` by class; for any Hugging Face causal LM next-token cross-entropy
    on shifted targets (`causal_lm_loss`); for any other model whose forward takes ``labels``, its own loss
    (`model_loss`); for a timm-style classifier (it has ``forward_head``) cross-entropy on its logits. ValueError
    naming what is known otherwise."""
    name = type(model).__name__
    if name in TASK_LOSSES:
        return TASK_LOSSES[name]
    if _is_causal_lm(model):
        return causal_lm_loss
    if "labels" in inspect.signature(model.forward).parameters:
        return model_loss
    if callable(getattr(model, "forward_head", None)):  # timm's classifier convention, which ours follow
        return classification_loss
    raise ValueError(f"no task loss known for {name}: it is no Hugging Face causal LM (LlamaForCausalLM, ...), "
                     f"takes no labels, has no forward_head (a timm-style classifier) and is none of "
                     f"{sorted(TASK_LOSSES)}; pass loss_fn=f where f(model, (inputs, targets)) returns the mean loss")


@dataclass(frozen=True)
class ProSparseConfig:
    """A ProSparse run. Saved with every checkpoint, so a resumed run is checked to be the same run.

    steps: optimiser steps in total, the ReLU-only phase included.
    relu_steps: steps of step 1 (ReLU, λ = 0). None: the paper's share, 5000 of 16500 steps.
    stages: the regularisation stages of step 2 as (end step, λ), end steps counted from the end of the
        ReLU-only phase, read as `ProSparseSchedule` reads a table (first stage a flat warmup, then sine rises);
        λ holds its last value if they end before ``steps``. None: the paper's 7B stages scaled to the steps left.
    threshold: FATReLU threshold of step 3 (the paper's 0.01; 0 keeps plain ReLU).
    lr, min_lr, warmup_steps, weight_decay, clip_grad: AdamW with linear warmup then cosine decay to min_lr, the
        paper's optimiser (its 7B peak lr is 3e-5; a small model trained here needs more, e.g. 1e-3).
    batch_size, seq_len: how the data is cut into batches (by the caller, e.g. `lm_batches`); recorded so that a
        resumed run is checked to read its data the same way.
    eval_every: evaluate (and checkpoint) every this many steps, and after the last one.
    seed: seeds torch's global RNG at the start (dropout, drop path); callers seed their data with it too.
    normalization: of the L1 term, see `SparsityRegularizer` ("mean": λ does not depend on batch or width).
    """

    steps: int = 1000
    relu_steps: int | None = None
    stages: tuple[tuple[int, float], ...] | None = None
    threshold: float = 0.01
    lr: float = 3e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0
    batch_size: int = 8
    seq_len: int = 256
    eval_every: int = 100
    seed: int = 0
    normalization: str = "mean"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected an integer in [0, steps={self.steps}]")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        if self.relu_steps is not None and (not is_int(self.relu_steps) or not 0 <= self.relu_steps < self.steps):
            raise ValueError(f"relu_steps={self.relu_steps!r}: expected an integer in [0, steps={self.steps}) or None "
                             "(the paper's share of steps)")
        if not is_real(self.threshold) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold={self.threshold!r}: expected a finite number >= 0")
        check_optimizer_settings(self.lr, self.min_lr, self.weight_decay, self.clip_grad)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
        if self.stages is not None:
            object.__setattr__(self, "stages", ProSparseSchedule(self.stages).stages)  # validated, as tuples
            end = self.relu_phase_steps + self.stages[-1][0]
            if end > self.steps:
                raise ValueError(f"stages={[list(s) for s in self.stages]}: they end at step {end} (after "
                                 f"{self.relu_phase_steps} ReLU-only steps), beyond steps={self.steps}")
        else:
            left = self.steps - self.relu_phase_steps
            try:
                ProSparseSchedule(_7B_REGULARIZATION).scaled(left)
            except ValueError as err:
                raise ValueError(f"steps={self.steps}: the {left} steps after the ReLU-only phase are too few for "
                                 f"the default stages (ProSparse-7B's {len(_7B_REGULARIZATION)}); use more steps "
                                 "or give stages") from err

    @property
    def relu_phase_steps(self) -> int:
        """Length of step 1: ``relu_steps``, or the paper's share of ``steps`` (rounded as `scaled` rounds)."""
        if self.relu_steps is not None:
            return self.relu_steps
        total = PROSPARSE_7B[-1][0]
        return (_7B_RELU_STEPS * self.steps + total // 2) // total

    @property
    def schedule(self) -> ProSparseSchedule:
        """λ over the whole run: 0 for the ReLU-only phase, then the regularisation stages after it."""
        relu = self.relu_phase_steps
        stages = self.stages or ProSparseSchedule(_7B_REGULARIZATION).scaled(self.steps - relu).stages
        leading = ((relu, 0.0),) if relu else ()
        return ProSparseSchedule(leading + tuple((relu + end, lam) for end, lam in stages))

    def to_dict(self) -> dict:
        """JSON-able fields (stages as lists, as JSON gives them back)."""
        values = dataclasses.asdict(self)
        values["stages"] = None if self.stages is None else [list(stage) for stage in self.stages]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ProSparseConfig:
        return config_from_dict(cls, values, "ProSparse")


@dataclass
class ProSparseResult:
    """What a run did and reached.

    history: one entry per evaluation (during steps 1-2, so with ReLU): step, lambda, lr, train_loss (mean task
        loss since the previous entry, without the penalty), val_loss and sparsity (mean zero fraction of x₁
        over the FFNs on the eval batches, ProSparse's definition).
    initial_*: the model as given, before step 1; final_*: after step 3 (FATReLU). Perplexity is exp(val loss),
        meaningful for language models. report: the final per-layer `SparsityReport`.
    """

    config: dict
    schedule: list[list]
    start_step: int
    seconds: float
    initial_val_loss: float
    initial_sparsity: float
    final_val_loss: float
    final_perplexity: float
    final_sparsity: float
    report: SparsityReport
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable values; the report as `SparsityReport.to_dict`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "report": self.report.to_dict()}


def _pair(batch, device: torch.device) -> Batch:
    """(inputs, targets) on ``device``. The sparsity batch convention (`measure_sparsity`) with targets required,
    as the task loss needs them: inputs are a tensor or a dict of model keyword arguments (a custom ``loss_fn``
    calls ``model(**inputs)``; the built-in losses take tensors)."""
    inputs, targets = split_pair(batch)
    return to_device(inputs, device), targets.to(device)


def _evaluate(model: nn.Module, batches: Iterable, loss_fn: TaskLoss, specs: Iterable[FFNSpec] | None,
              device: torch.device) -> tuple[float, SparsityReport]:
    """(mean loss over every target of ``batches``, sparsity report on their inputs), in eval mode."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            batch = _pair(batch, device)
            total += float(loss_fn(model, batch)) * batch[1].numel()
            count += batch[1].numel()
    if count == 0:
        raise ValueError("eval_batches is empty: expected at least one (inputs, targets) batch")
    return total / count, measure_sparsity(model, (_pair(batch, device)[0] for batch in batches), specs)


def prosparse(model: nn.Module, train_batches: Iterable, config: ProSparseConfig, eval_batches: Iterable, *,
              progress: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False,
              loss_fn: TaskLoss | None = None, specs: Iterable[FFNSpec] | None = None) -> ProSparseResult:
    """Make ``model``'s FFN activations sparse with ProSparse's three steps, in place; return what it reached.

    train_batches: (inputs, targets) pairs, at least ``config.steps`` of them (e.g. the endless `lm_batches`);
        under torchrun each process trains on its slice of every batch (`leanformer.engine.shard`).
    eval_batches: (inputs, targets) pairs read at every evaluation, so re-iterable (a list, a DataLoader).
    checkpoint_dir: if given, model, optimizer and RNG state are saved there at every evaluation
        (`leanformer.engine.checkpoint` format). It must not hold a checkpoint already unless ``resume``, and its
        lock is held while the run goes on (another process writing it is refused).
    resume: continue the run checkpointed in ``checkpoint_dir``: pass the model as it was given to the first
        call (e.g. loaded again) and ``train_batches`` made again the same way; the batches the checkpointed
        steps used are drawn and skipped, so the run ends bit-identical to an uninterrupted one.
    loss_fn: ``f(model, batch) -> mean loss``; default `task_loss_for(model)`. specs: FFN table, see `find_ffns`.

    The model is left in eval mode with FATReLU(config.threshold) in every FFN; a Hugging Face model's config
    records it (see `relufy`): save it with `leanformer.save_pretrained`, reload with `load_pretrained`. A
    non-finite training loss stops the run there (`NonFiniteLossError`), the last checkpoint kept as it was.
    """
    loss_fn = loss_fn or task_loss_for(model)
    if iter(eval_batches) is eval_batches:
        raise ValueError("eval_batches must be re-iterable (a list, a DataLoader): it is read at every evaluation")
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    check_resume(checkpoint_dir, resume, "checkpoint_dir")
    with process_group() as ctx, claim_run_folder(checkpoint_dir if ctx.is_main else None, ("meta.json",),
                                                  resume=resume):
        return _prosparse(model, train_batches, config, eval_batches, progress, checkpoint_dir, resume, loss_fn,
                          specs)


def _prosparse(model: nn.Module, train_batches: Iterable, config: ProSparseConfig, eval_batches: Iterable,
               progress: bool, checkpoint_dir: Path | None, resume: bool, loss_fn: TaskLoss,
               specs: Iterable[FFNSpec] | None) -> ProSparseResult:
    """`prosparse` once its arguments are checked and its checkpoint folder (if any) is held by this process."""
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    initial_loss, initial_report = _evaluate(model, eval_batches, loss_fn, specs, device)

    relufy(model, ReLUConfig(specs=specs))  # step 1
    schedule = config.schedule
    regularizer = SparsityRegularizer(model, schedule, specs, config.normalization)  # step 2 (λ = 0 in step 1)

    def evaluate(model: nn.Module) -> dict:
        val_loss, report = _evaluate(model, eval_batches, loss_fn, specs, device)
        return {"lambda": regularizer.current_lambda, "val_loss": val_loss, "sparsity": report.average_sparsity}

    loop = LoopConfig(steps=config.steps, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                      weight_decay=config.weight_decay, clip_grad=config.clip_grad, eval_every=config.eval_every,
                      desc="prosparse")
    checkpoint = None if checkpoint_dir is None else Checkpointing(checkpoint_dir, config.to_dict(), lock=False)
    try:
        done = fit(model, (_pair(batch, device) for batch in train_batches), loss_fn, loop, evaluate=evaluate,
                   extra_losses=[lambda step, model: regularizer.loss(step)], checkpoint=checkpoint, resume=resume,
                   progress=progress)
    finally:
        regularizer.remove()

    relufy(model, ReLUConfig("fatrelu", config.threshold, specs=specs))  # step 3
    final_loss, report = _evaluate(model, eval_batches, loss_fn, specs, device)
    return ProSparseResult(
        config=config.to_dict(), schedule=[list(stage) for stage in schedule.stages], start_step=done.start_step,
        seconds=done.seconds, initial_val_loss=initial_loss, initial_sparsity=initial_report.average_sparsity,
        final_val_loss=final_loss, final_perplexity=math.exp(final_loss) if final_loss < 700 else math.inf,
        final_sparsity=report.average_sparsity, report=report, history=done.history)

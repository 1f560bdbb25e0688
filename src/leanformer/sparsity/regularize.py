"""Progressive sparsity regularisation of the FFN intermediate activations.

ProSparse (Song et al., "ProSparse: Introducing and Enhancing Intrinsic Activation Sparsity within Large
Language Models", 2024) makes a ReLU-activated LLM much sparser by adding λ·Σ_layers ‖x₁‖₁ to the training
loss, where x₁ is the FFN intermediate output (the input of the down projection), and by raising λ slowly:
a flat warmup, then one smooth sine-shaped rise per stage, with equal consecutive peaks holding λ flat.
Raising λ abruptly (or using one constant λ) shifts the activation distribution too fast and costs accuracy:
the paper's constant λ = 0.1 reaches about the same sparsity but loses two points of average score.

- `ProSparseSchedule`: the stage table (end step, λ) and the λ(step) it defines; `PROSPARSE_7B` and
  `PROSPARSE_13B` are the paper's tables, `scaled()` stretches one to a shorter run.
- `SparsityRegularizer`: forward pre-hooks on each FFN's down projection (found through `find_ffns`, so any
  model with a known or described FFN) that sum the L1 norm of x₁ during training forwards; `loss(step)`
  returns λ(step) times that sum and starts the next one. Fused mixture-of-experts modules (Mixtral) have no
  down projection module: their x₁ = act(gate) * up per (token, chosen expert) pair is recomputed from the
  experts module's inputs (`FFN.hook_x1`), at the cost of a second gate/up projection of those experts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn as nn

from .._checks import is_int, is_real
from ._tokens import PaddingMasks, align_mask, mask_of, rows_mask
from .ffn import FFN, ExpertRows, FFNSpec, find_ffns

__all__ = ["PROSPARSE_13B", "PROSPARSE_7B", "NORMALIZATIONS", "ProSparseSchedule", "SparsityRegularizer"]

# (end step, λ) per stage, from the paper (LLaMA2-7B and LLaMA2-13B)
PROSPARSE_7B: tuple[tuple[int, float], ...] = (
    (5000, 0.0), (6000, 5e-3), (10000, 5e-2), (12000, 5e-2), (16000, 2e-1), (16500, 2e-1))
PROSPARSE_13B: tuple[tuple[int, float], ...] = (
    (5500, 0.0), (6750, 5e-3), (10750, 1e-2), (11000, 1e-2), (15000, 2e-2), (16000, 2e-2))

NORMALIZATIONS = ("mean", "sum")


@dataclass(frozen=True)
class ProSparseSchedule:
    """The regularisation factor λ as a function of the training step, from a table of (end step, λ) stages.

    Stage i covers the steps T_{i-1} <= t < T_i (T_0 = 0); λ_i is the value it ends on:

    - Leading stages with λ = 0 are ProSparse's step 1 (training after the ReLU substitution, no
      regularisation): λ = 0 there.
    - The first stage with λ > 0 is the warmup: λ is flat at its λ from its first step on.
    - Every later stage rises from λ_{i-1} to λ_i along η = ½[sin(−π/2 + π·(t − T_{i−1})/(T_i − T_{i−1})) + 1],
      λ = λ_{i−1} + η·(λ_i − λ_{i−1}); equal consecutive λ hold it flat.
    - From the last end step on, λ stays at the last value.

    With the paper's 7B table this gives 0 before step 5000, 5e-3 from 5000 to 6000, 0.0275 at 8000 (half-way
    up the 6000-10000 rise), 0.05 from 10000 to 12000, 0.125 at 14000 and 0.2 from 16000 on. Reading the
    (5000, 0) stage as the warmup instead would make 5000-6000 a rise from 0 (2.5e-3 at 5500); the reading
    above keeps the paper's "flat warmup, then sine rises" shape for the regularisation itself. The schedule is
    continuous except at the start of the warmup, where λ steps from 0 to the warmup value.
    """

    stages: Sequence[tuple[int, float]]

    def __post_init__(self) -> None:
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, Iterable):
            raise ValueError(f"stages must be a sequence of (end_step, lambda) pairs, got {self.stages!r}")
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("stages must not be empty: give at least one (end_step, lambda) pair")
        checked = []
        previous_end = 0
        for i, stage in enumerate(stages):
            if isinstance(stage, (str, bytes)) or not isinstance(stage, Iterable) or len(tuple(stage)) != 2:
                raise ValueError(f"stages[{i}] must be an (end_step, lambda) pair, got {stage!r}")
            end, lam = tuple(stage)
            if not is_int(end):
                raise ValueError(f"stages[{i}] end step must be an int, got {end!r} ({type(end).__name__})")
            if end <= previous_end:
                raise ValueError(f"stages[{i}] end step {end} must be greater than the previous end step "
                                 f"{previous_end}: end steps must be positive and strictly increasing")
            if not is_real(lam) or not math.isfinite(lam) or lam < 0:
                raise ValueError(f"stages[{i}] lambda must be a finite number >= 0, got {lam!r}")
            checked.append((int(end), float(lam)))
            previous_end = end
        object.__setattr__(self, "stages", tuple(checked))

    @classmethod
    def constant(cls, lam: float, steps: int) -> ProSparseSchedule:
        """The constant-λ baseline (the paper's ablation): λ from step 0 on."""
        return cls(((steps, lam),))

    @property
    def total_steps(self) -> int:
        return self.stages[-1][0]

    @property
    def final_value(self) -> float:
        return self.stages[-1][1]

    @property
    def _warmup(self) -> int:
        # index of the warmup stage: the first with λ > 0 (the last one if all are 0)
        return next((i for i, (_, lam) in enumerate(self.stages) if lam > 0), len(self.stages) - 1)

    def value(self, step: float) -> float:
        """λ at training step ``step`` (0-based; fractional steps are allowed)."""
        if not is_real(step) or not step >= 0:
            raise ValueError(f"step must be a number >= 0, got {step!r}")
        warmup = self._warmup
        start, lam_start = 0, 0.0
        for i, (end, lam) in enumerate(self.stages):
            if step < end:
                if i <= warmup:
                    return lam
                eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - start) / (end - start)) + 1.0)
                return lam_start + eta * (lam - lam_start)
            start, lam_start = end, lam
        return self.final_value

    __call__ = value

    def scaled(self, steps: int) -> ProSparseSchedule:
        """The same schedule stretched to end at ``steps``: every end step scaled by steps / total_steps.

        For short runs: ``ProSparseSchedule(PROSPARSE_7B).scaled(1650)`` has the paper's shape over 1650 steps.
        """
        if not is_int(steps) or steps <= 0:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        total = self.total_steps
        ends = [(end * steps + total // 2) // total for end, _ in self.stages]
        if ends[0] <= 0 or any(b <= a for a, b in pairwise(ends)):
            raise ValueError(f"steps={steps} is too few to keep the {len(ends)} stages distinct "
                             f"(scaled end steps {ends}); use more steps or fewer stages")
        return ProSparseSchedule(tuple(zip(ends, (lam for _, lam in self.stages), strict=True)))


def _counted(module: nn.Module) -> bool:
    """Whether a forward of ``module`` is a training forward the regulariser counts."""
    return module.training and torch.is_grad_enabled()


class SparsityRegularizer:
    """λ(step)·Σ_layers ‖x₁‖₁ over the FFNs of ``model``, measured by hooks during training forwards.

    Usage, once per optimiser step (``loss`` also starts the next sum)::

        reg = SparsityRegularizer(model, ProSparseSchedule(PROSPARSE_7B).scaled(total_steps))
        out = model(**batch)
        loss = out.loss + reg.loss(step)

    normalization:
        "mean" (default): per layer, the mean of |x₁| over tokens and hidden units; summed over layers. Like
        the usual token-averaged task loss it does not grow with batch size, sequence length or FFN width, so
        the balance between the two, and hence a λ tuned on one setup, carries over to another.
        "sum": the raw ‖x₁‖₁ of the paper's formula (summed over all tokens and units of the batch); its
        weight against a token-averaged loss grows with the number of tokens and units, so λ must be retuned
        whenever the batch, sequence length or width changes. λ values do not transfer between the two.

    Only forwards in training mode with gradients enabled are counted (``model.eval()`` or ``torch.no_grad()``
    leave it idle). Only a scalar per layer is kept: the L1 norm reuses x₁, which the down projection
    already saves for backward. All tokens are regularised, padding included, unless a mask is given for the
    forward with ``with reg.attention_mask(mask): model(...)``. ``loss`` must be called after each counted
    forward: the running sum holds on to its autograd graph until then. FFNs recomputed by activation
    checkpointing during backward would be counted again (into the next sum): do not checkpoint them.
    ``last_sparsity`` is the fraction of zeros in x₁ over the FFNs in the last counted forward.
    """

    def __init__(self, model: nn.Module, schedule: ProSparseSchedule | Sequence[tuple[int, float]],
                 specs: Iterable[FFNSpec] | None = None, normalization: str = "mean") -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.schedule = schedule if isinstance(schedule, ProSparseSchedule) else ProSparseSchedule(schedule)
        self.normalization = normalization
        self.ffns: list[FFN] = find_ffns(model, specs)
        self.current_lambda = 0.0
        self._total: torch.Tensor | None = None
        self._masks: PaddingMasks = {False: None, True: None}
        self._zero_fractions: dict[int, torch.Tensor] = {}  # FFN index -> zero fraction in its last forward
        self._handles = [ffn.hook_x1(self._hook_for(i), _counted) for i, ffn in enumerate(self.ffns)]

    def _hook_for(self, index: int):
        def hook(_module: nn.Module, x1: torch.Tensor, rows: ExpertRows | None) -> None:
            if x1.requires_grad:
                self._measure(index, x1, rows)
        return hook

    def _measure(self, index: int, x1: torch.Tensor, rows: ExpertRows | None) -> None:
        ffn = self.ffns[index]
        x1, mask = align_mask(x1, rows_mask(mask_of(ffn, self._masks), rows, ffn.name), ffn.name)
        mask = None if mask is None else mask.to(torch.float32)
        units = x1.shape[-1]
        # abs saves x1 (already kept by the down matmul); the per-token sums keep nothing of x1's size
        per_token = x1.abs().sum(-1, dtype=torch.float32)
        if mask is None:
            l1, tokens = per_token.sum(), per_token.numel()
        else:
            l1, tokens = (per_token * mask).sum(), mask.sum().clamp_min(1)
        term = l1 / (tokens * units) if self.normalization == "mean" else l1
        self._total = term if self._total is None else self._total + term
        with torch.no_grad():
            zeros = (x1 == 0).sum(-1, dtype=torch.float32)
            zeros = zeros.sum() if mask is None else (zeros * mask).sum()
            self._zero_fractions[index] = zeros / (tokens * units)  # a tensor: no device sync here

    @contextmanager
    def attention_mask(self, mask: torch.Tensor | None,
                       decoder_mask: torch.Tensor | None = None) -> Iterator[SparsityRegularizer]:
        """Count only the tokens where ``mask`` is nonzero (shape: the FFN input without its features, or
        (batch, seq) for an FFN that flattens them); the decoder FFNs of an encoder-decoder model (T5) use
        ``decoder_mask`` instead, all their tokens when it is None."""
        previous = self._masks
        self._masks = {False: None if mask is None else mask.detach(),
                       True: None if decoder_mask is None else decoder_mask.detach()}
        try:
            yield self
        finally:
            self._masks = previous

    def loss(self, step: float) -> torch.Tensor:
        """λ(step) times the L1 sum since the last call (a zero tensor if λ is 0 or nothing was counted)."""
        lam = self.schedule(step)
        self.current_lambda = lam
        total, self._total = self._total, None
        if total is None or lam == 0:
            device = total.device if total is not None else self._device()
            return torch.zeros((), device=device)
        return lam * total

    def reset(self) -> None:
        """Drop the running sum (and its graph) without computing a loss."""
        self._total = None

    @property
    def last_sparsity(self) -> float | None:
        """Fraction of zeros in x₁, averaged over the FFNs of the last counted forward (None before one)."""
        if not self._zero_fractions:
            return None
        return float(torch.stack([f.to(self._device()) for f in self._zero_fractions.values()]).mean())

    def _device(self) -> torch.device:
        return self.ffns[0].weight("down").device

    def remove(self) -> None:
        """Take the hooks off the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._total = None

    def __enter__(self) -> SparsityRegularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ffns={len(self.ffns)}, normalization={self.normalization!r}, "
                f"stages={self.schedule.stages})")

"""Measure FFN activation sparsity: the zeros in x1, the input of each FFN's down projection.

Definitions follow the papers: ProSparse (Song et al. 2024) reports sparsity as the fraction of zeros
in x1 per token, averaged over layers (`SparsityReport.average_sparsity`); the Lazy Neuron Phenomenon
(Li et al., ICLR 2023) reports its complement as "nonzero %" (`SparsityReport.nonzero_percent`).
Per-token sparsity is what batch-1 inference can skip. A batch of tokens can only skip the hidden units
that are zero for all of them, so each layer also reports the union-over-sequence active fraction:
the share of units nonzero for at least one token of a sample.

    report = measure_sparsity(model, [images[:32], images[32:64]])
    report.average_sparsity, report.layers[0].p90, report.plot("sparsity.png")
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .._io import atomic_write
from ._batches import split_batch
from ._tokens import align_mask, mask_of, padding_masks, rows_mask
from .ffn import FFNSpec, find_ffns

__all__ = ["LayerSparsity", "SparsityReport", "measure_sparsity"]

_PERCENTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one FFN's x1 over every (unmasked) token measured.

    ``mean_sparsity`` and ``p10/p50/p90`` are the mean and percentiles (linear interpolation, as
    ``torch.quantile``) of the per-token zero fraction. ``union_active_fraction`` is the fraction of the
    ``hidden`` units nonzero for at least one token of a sample, averaged over ``samples`` samples; it is
    None when x1 has no sequence dimension (2-D x1: every row is a token of its own).
    """

    name: str
    hidden: int
    tokens: int
    mean_sparsity: float
    p10: float
    p50: float
    p90: float
    union_active_fraction: float | None
    samples: int


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer activation sparsity, in forward order, and the model-level averages."""

    layers: tuple[LayerSparsity, ...]

    @property
    def average_sparsity(self) -> float:
        """Mean over layers of the zero fraction of x1 (ProSparse's sparsity)."""
        return sum(layer.mean_sparsity for layer in self.layers) / len(self.layers)

    @property
    def nonzero_percent(self) -> float:
        """100 * (1 - average_sparsity): the Lazy Neuron paper's "percentage of nonzero entries"."""
        return 100.0 * (1.0 - self.average_sparsity)

    @property
    def average_union_active_fraction(self) -> float | None:
        """Mean over the layers that have one of the union-over-sequence active fraction."""
        values = [layer.union_active_fraction for layer in self.layers if layer.union_active_fraction is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable numbers and strings."""
        return {"average_sparsity": self.average_sparsity, "nonzero_percent": self.nonzero_percent,
                "average_union_active_fraction": self.average_union_active_fraction,
                "layers": [asdict(layer) for layer in self.layers]}

    def plot(self, path: str | Path, title: str | None = None) -> None:
        """Write a PNG with one group of bars per layer: zero fraction and union active fraction.

        Uses matplotlib's Agg canvas directly, so the caller's pyplot backend and state are untouched.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(self.layers)
        fig = Figure(figsize=(max(7.0, 0.35 * n + 2.0), 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x = list(range(n))
        width = 0.4
        ax.bar([i - width / 2 for i in x], [layer.mean_sparsity for layer in self.layers], width,
               label="zero fraction per token (mean)", color="tab:blue")
        union = [layer.union_active_fraction for layer in self.layers]
        if any(u is not None for u in union):
            ax.bar([i + width / 2 for i in x], [u if u is not None else 0.0 for u in union], width,
                   label="active for >= 1 token of a sample", color="tab:orange")
        ax.axhline(self.average_sparsity, color="tab:blue", linestyle="--", linewidth=1,
                   label=f"average sparsity {self.average_sparsity:.3f}")
        ax.set_xticks(x, [str(i) for i in x])
        ax.set_xlabel("FFN layer (forward order)")
        ax.set_ylabel("fraction of hidden units")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"FFN activation sparsity ({n} layers)")
        fig.legend(loc="outside lower center", ncols=3, fontsize="small")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


class _LayerCounter:
    """Running counts for one FFN, kept on x1's device; holds no activation tensors between calls."""

    def __init__(self, name: str, hidden: int):
        self.name = name
        self.hidden = hidden
        self.histogram: torch.Tensor | None = None  # tokens by their number of zeros (0..hidden)
        self.union_sum: torch.Tensor | None = None  # sum over samples of the union active fraction
        self.samples = 0
        self.has_sequence = False

    def update(self, x1: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Count one call's x1, features last; ``mask`` as the batch gave it (see `align_mask`)."""
        x1, mask = align_mask(x1, mask, self.name)
        if self.histogram is None:
            self.histogram = torch.zeros(self.hidden + 1, dtype=torch.int64, device=x1.device)
            self.union_sum = torch.zeros((), dtype=torch.float64, device=x1.device)
        nonzero = x1.detach() != 0
        if nonzero.dim() >= 3:  # (sample, sequence or H, W, ..., hidden): union over each sample's tokens
            self.has_sequence = True
            per_sample = nonzero.reshape(nonzero.shape[0], -1, self.hidden)
            if mask is not None:
                keep = mask.reshape(mask.shape[0], -1)
                per_sample = (per_sample & keep[..., None])[keep.any(1)]  # samples that are all padding drop out
            self.union_sum += (per_sample.any(1).sum(1, dtype=torch.float64) / self.hidden).sum()
            self.samples += per_sample.shape[0]
        tokens = nonzero.reshape(-1, self.hidden)
        if mask is not None:
            tokens = tokens[mask.reshape(-1)]
        zeros = self.hidden - tokens.sum(1)
        self.histogram += torch.bincount(zeros, minlength=self.hidden + 1)

    def result(self) -> LayerSparsity:
        histogram = None if self.histogram is None else self.histogram.cpu()
        tokens = 0 if histogram is None else int(histogram.sum())
        if tokens == 0:
            raise ValueError(f"FFN {self.name!r} saw no tokens (it never ran, or every token was masked out)")
        levels = torch.arange(self.hidden + 1, dtype=torch.float64) / self.hidden
        zeros = int((histogram * torch.arange(self.hidden + 1)).sum())
        mean = zeros / (tokens * self.hidden)
        p10, p50, p90 = (_histogram_quantile(histogram, levels, q) for q in _PERCENTILES)
        union = float(self.union_sum) / self.samples if self.has_sequence and self.samples else None
        return LayerSparsity(self.name, self.hidden, tokens, mean, p10, p50, p90, union, self.samples)


def _histogram_quantile(histogram: torch.Tensor, levels: torch.Tensor, q: float) -> float:
    """The q-quantile of the values ``levels`` repeated ``histogram`` times, as torch.quantile (linear)."""
    cumulative = histogram.cumsum(0).tolist()
    position = q * (cumulative[-1] - 1)
    lo, frac = int(position), position - int(position)

    def value(index: int) -> float:  # the index-th smallest value (0-based)
        return float(levels[bisect_right(cumulative, index)])

    low = value(lo)
    return low if frac == 0 else low + (value(lo + 1) - low) * frac


def measure_sparsity(model: nn.Module, batches: Iterable, specs: Iterable[FFNSpec] | None = None,
                     mask_key: str | None = "attention_mask") -> SparsityReport:
    """Run ``model`` on every batch and report the zeros of each FFN's x1 (the input of its down projection).

    A batch is a tensor (``model(x)``), a dict (``model(**kwargs)``, as Hugging Face models take) or an
    ``(inputs, targets)`` pair, the format `prosparse` takes (``model(inputs)``, or ``model(**inputs)`` for a
    dict; the targets are ignored, never passed to the model). If the keyword arguments hold ``mask_key`` (a
    (batch, seq) tensor, nonzero = real token, as HF's ``attention_mask``), padding tokens are left out of every
    statistic: they are computed but would distort both the per-token zero fraction and the union over the
    sequence. ``mask_key=None`` counts every token. An FFN that flattens batch and sequence into rows (OPT) is
    masked as (batch, seq); the decoder FFNs of an encoder-decoder model (T5) take ``"decoder_" + mask_key``
    (``decoder_attention_mask``) if the batch has it and count every decoder token otherwise.

    A token is one position of x1 with its features last (an NCHW map of a 1x1 Conv2d FFN is read as NHWC) and
    all leading dimensions flattened; for x1 of 3 or more dimensions the first is the sample and the middle ones
    (a sequence, or the H, W of a map) its tokens. A value
    counts as zero only if it is exactly 0. The model runs in eval mode under no_grad; the training flags
    of all its modules are restored afterwards and the hooks are removed, even if the forward raises.

    Fused mixture-of-experts modules (Mixtral) count one token per (token, chosen expert) pair: x1 = act(gate) * up
    of that expert, recomputed from the experts module's inputs (`FFN.hook_x1`); padding is left out pair by pair,
    and their x1 has no sequence dimension (union_active_fraction None).
    """
    ffns = find_ffns(model, specs)
    counters = [_LayerCounter(ffn.name, ffn.hidden_features) for ffn in ffns]
    modes = [(module, module.training) for module in model.modules()]
    current = {False: None, True: None}  # the running batch's encoder/decoder masks, read by the hooks

    def make_hook(ffn, counter: _LayerCounter):
        def hook(_module, x1, rows):
            counter.update(x1, rows_mask(mask_of(ffn, current), rows, ffn.name))

        return hook

    handles = []
    n_batches = 0
    try:
        for ffn, counter in zip(ffns, counters, strict=True):
            handles.append(ffn.hook_x1(make_hook(ffn, counter)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                call = split_batch(batch)
                current.update(padding_masks(call, mask_key))
                call.run(model)
                n_batches += 1
    finally:
        current.update({False: None, True: None})
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if n_batches == 0:
        raise ValueError("measure_sparsity needs at least one batch; `batches` was empty")
    return SparsityReport(tuple(counter.result() for counter in counters))

"""Sparse FFN activations: ReLU, FATReLU (ProSparse) and per-token top-k (Lazy Neuron), and ReLUfication.

The Lazy Neuron Phenomenon (Li et al., ICLR 2023) observes that the FFN activation maps of ReLU
Transformers are very sparse and that keeping only the k largest activations per token (`TopK`)
costs no accuracy. ProSparse (Song et al. 2024) makes a gated LLM sparse by swapping its gate
activation for ReLU (`relufy`), training with an L1 penalty, and finally raising the cut-off to a
small positive threshold (`FATReLU`, t = 0.01 in the paper). Zeros in the FFN intermediate output
are the work sparse inference skips.

`relufy` and `apply_topk` edit the FFNs found by `find_ffns` (ours, timm, Hugging Face) in place;
`restore_activations` undoes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._checks import check_int, check_real
from .ffn import FFNSpec, check_ffn_selection, find_ffns, selected_ffns

__all__ = ["RELUFY_ACTIVATIONS", "FATReLU", "ReLUConfig", "TopK", "TopKConfig", "apply_topk", "is_topk_wrapped",
           "relufy", "restore_activations", "topk_wrapped"]

RELUFY_ACTIVATIONS = ("relu", "fatrelu")


class FATReLU(nn.Module):
    """Forward-activated threshold ReLU: x if x >= threshold else 0 (ProSparse step 3).

    A small positive threshold zeroes the weak positive activations plain ReLU keeps, which adds
    sparsity at a small cost in quality (the paper sweeps t = 0.005..0.02). The gradient is 1 where
    x is kept and 0 where it is zeroed; threshold 0 is ReLU except that the gradient at exactly 0 is 1.
    """

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"FATReLU threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x < self.threshold, 0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class TopK(nn.Module):
    """Keep the k largest values along dimension ``dim`` (per token; the features) and zero the rest (Lazy Neuron).

    Meant to follow the FFN activation (`apply_topk` places it after ReLU/GELU/...): it ranks the
    activation outputs by value, not by magnitude, so after GELU a large negative output is dropped.
    The gradient reaches only the kept entries. With k >= the size of ``dim`` it is the identity. Ties are
    broken by `torch.topk`, so exactly k positions are kept. ``dim`` is -1 except for FFNs on NCHW maps
    (1x1 Conv2d FFNs), whose features are dimension 1.
    """

    def __init__(self, k: int, dim: int = -1):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK k must be an integer >= 1, got {k!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"TopK dim must be an integer, got {dim!r}")
        self.k, self.dim = k, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k >= x.shape[self.dim]:
            return x
        values, indices = x.topk(self.k, dim=self.dim, sorted=False)
        return torch.zeros_like(x).scatter(self.dim, indices, values)

    def extra_repr(self) -> str:
        return f"k={self.k}" if self.dim == -1 else f"k={self.k}, dim={self.dim}"


@dataclass(frozen=True)
class ReLUConfig:
    """What `relufy` sets: ``activation`` "relu", or "fatrelu" with its ``threshold`` (ProSparse's t = 0.01), in
    every FFN `find_ffns` finds (``specs``: its table, default `FFN_SPECS`) that ``target_modules`` selects (FFN
    module names or name endings, or one regex, as every config selects modules; None: every FFN)."""

    activation: str = "relu"
    threshold: float = 0.0
    specs: tuple[FFNSpec, ...] | None = None
    target_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.activation not in RELUFY_ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {', '.join(RELUFY_ACTIVATIONS)}")
        check_real("threshold", self.threshold, minimum=0)
        if self.activation == "relu" and self.threshold != 0:
            raise ValueError(f"threshold={self.threshold!r} applies only to activation='fatrelu' (ReLU's threshold "
                             "is 0)")
        check_ffn_selection(self)


@dataclass(frozen=True)
class TopKConfig:
    """What `apply_topk` sets: keep the ``k`` largest activations per token in every FFN (``specs`` and
    ``target_modules`` as in `ReLUConfig`)."""

    k: int
    specs: tuple[FFNSpec, ...] | None = None
    target_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=1)
        check_ffn_selection(self)


def relufy(model: nn.Module, config: ReLUConfig = ReLUConfig()) -> nn.Module:
    """Replace the activation of every FFN of ``model`` with ReLU or FATReLU(threshold) as ``config`` says, in
    place; return ``model``.

    In a gated FFN (LLaMA) the gate activation is replaced, as ProSparse does, so x1 = relu(gate(x)) * up(x)
    is zero wherever the gate is. Without further training the outputs change (the model was trained with
    its original activation): ProSparse continues training after this step.

    If `apply_topk` was applied before, the activation inside its wrapper is replaced and the TopK kept.
    A Hugging Face model's config is updated so that a saved copy reloads as this model or not at all (see
    `leanformer.sparsity.pretrained`); `leanformer.save_pretrained` / `load_pretrained` round-trip it exactly.
    """
    if not isinstance(config, ReLUConfig):
        raise ValueError(f"relufy(model, config): expected a ReLUConfig, got {config!r}")
    specs = config.specs
    ffns = selected_ffns(model, specs, config.target_modules)
    _remember_activations(model, ffns)
    for ffn in ffns:
        new = nn.ReLU() if config.activation == "relu" else FATReLU(config.threshold)
        if is_topk_wrapped(ffn.act):
            ffn.act[0] = new  # keep the TopK that apply_topk added
        else:
            ffn.set_act(new)
    _record_in_config(model, specs)
    return model


def apply_topk(model: nn.Module, config: TopKConfig) -> nn.Module:
    """Follow every FFN activation of ``model`` with `TopK(config.k)`, in place; return ``model``.

    The activation becomes ``nn.Sequential(old_act, TopK(k))``; applying again replaces the k rather than
    stacking a second TopK. In a gated FFN the top-k is taken over act(gate(x)), before the product with
    up(x): x1 then has at most k nonzeros per token, the positions of the k largest gate activations. The
    top-k runs over the FFN's feature dimension (dimension 1 for 1x1 Conv2d FFNs on NCHW maps). An activation
    held as a plain function is wrapped as well (`nn.Sequential` calls it like a module).
    """
    if not isinstance(config, TopKConfig):
        raise ValueError(f"apply_topk(model, config): expected a TopKConfig, got {config!r}")
    k, specs = config.k, config.specs
    ffns = selected_ffns(model, specs, config.target_modules)
    _remember_activations(model, ffns)
    for ffn in ffns:
        act = ffn.act[0] if is_topk_wrapped(ffn.act) else ffn.act
        ffn.set_act(topk_wrapped(act, k, ffn.feature_dim))
    _record_in_config(model, specs)
    return model


def restore_activations(model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> nn.Module:
    """Undo `relufy` and `apply_topk` (any number of calls), in place; return ``model``: every FFN gets back the
    activation it had before the first of them, and a Hugging Face config its original activation fields.
    ValueError if neither was applied."""
    originals = model.__dict__.pop(_ORIGINAL_ACTIVATIONS, None)
    if not originals:
        raise ValueError(f"{type(model).__name__}: no activation to restore (relufy / apply_topk were not applied "
                         "to this model, or were undone)")
    for ffn in find_ffns(model, specs):
        if ffn.name in originals:
            ffn.set_act(originals[ffn.name])
    _record_in_config(model, specs)
    return model


# the root model's record of each FFN's activation before relufy / apply_topk first replaced it: a plain dict in
# the module's __dict__, so neither a submodule nor in state_dict, and copied with the model
_ORIGINAL_ACTIVATIONS = "_leanformer_original_activations"


def _remember_activations(model: nn.Module, ffns: list) -> None:
    originals = model.__dict__.setdefault(_ORIGINAL_ACTIVATIONS, {})
    for ffn in ffns:
        originals.setdefault(ffn.name, ffn.act)


def _record_in_config(model: nn.Module, specs: Iterable[FFNSpec] | None) -> None:
    from .pretrained import sync_hf_config  # imported here: pretrained builds on the activations of this module

    sync_hf_config(model, specs)


class _Function(nn.Module):
    """A plain activation function (a model may hold ``self.act = F.gelu``) as a module, so it can sit in
    `apply_topk`'s Sequential."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def topk_wrapped(act, k: int, dim: int = -1) -> nn.Sequential:
    """What `apply_topk` sets: Sequential(act, TopK(k, dim)), ``act`` a module or a plain function."""
    return nn.Sequential(act if isinstance(act, nn.Module) else _Function(act), TopK(k, dim))


def is_topk_wrapped(act: nn.Module) -> bool:
    """Whether ``act`` is what `apply_topk` sets: Sequential(activation, TopK)."""
    return isinstance(act, nn.Sequential) and len(act) == 2 and isinstance(act[1], TopK)

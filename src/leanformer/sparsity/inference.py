"""Sparse FFN inference: skip the zero hidden units of ReLU-family FFNs, exactly or with predictors.

A ReLU/FATReLU FFN (after `relufy` or `prosparse`) leaves most hidden units of a token at zero, and a zero
unit contributes nothing to the down projection. ProSparse (Song et al. 2024) turns this into speed on GPU;
PowerInfer (Song et al. 2023) and Deja Vu (Liu et al. 2023) predict the active units from the FFN input with
small per-layer predictors so that the gate, up and down projections are all computed for them only.
`sparsify_for_inference` swaps every FFN found by `find_ffns` for a sparse one, in place:

* ``mode="exact"`` — gated FFNs (LLaMA/Mistral/Qwen2): the gate is computed densely, then only the active
  rows of up and of down (neuron-major). Plain FFNs (BERT, ViT/Swin `Mlp`, MS-MLP): up is dense (it *is* the
  activation), the down projection skips the zero units. Outputs equal the dense FFN up to float rounding.
* ``mode="predictor"`` — gated FFNs: a `Predictors` set (see `predictor.py`) chooses the units, and gate, up and
  down are computed for those only. Units the predictor misses are lost (approximate); units it adds in
  excess are zeroed by the activation (harmless).

A batch of tokens shares one set of units, the union of theirs; when the union is larger than ``max_active``
(a fraction of the hidden units) the layer runs dense. ``max_active="auto"`` measures, for each FFN shape on
this machine, the largest active fraction at which the sparse path is still faster than the dense one.
Each swapped module counts which path ran (`inference_report`); nothing falls back silently.
The down weight is re-laid out neuron-major *in place* (the parameter becomes a transposed view of a
contiguous (hidden, out) tensor), so memory and ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._timing import time_interleaved
from .activations import FATReLU, TopK
from .ffn import FFN, FFNSpec, find_ffns
from .kernels import backend, gated_down, gather_matmul, input_sparse_down, scatter_matmul

__all__ = ["INFERENCE_MODES", "SparseGatedFFN", "SparseInputLinear", "calibrate_max_active", "inference_report",
           "sparsify_for_inference"]

INFERENCE_MODES = ("exact", "predictor")
_ELEMENTWISE = (nn.ReLU, FATReLU)
_PATH_NAMES = {"native": "sparse-native", "torch": "sparse-torch"}  # as reported by inference_report
_CALIBRATION_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _neuron_major(linear: nn.Linear) -> None:
    """Store a down Linear's (out, hidden) weight as the transpose of a contiguous (hidden, out) tensor."""
    if not linear.weight.t().is_contiguous():
        weight_t = linear.weight.detach().t().contiguous()
        linear.weight = nn.Parameter(weight_t.t(), requires_grad=linear.weight.requires_grad)


class _CountsPaths:
    """Counts, per call, which path ran and how many hidden units were computed."""

    def _reset_counts(self) -> None:
        self.calls: Counter = Counter()

    def _count(self, path: str, computed: int, total: int) -> None:
        self.calls[path] += 1
        self.calls["units_computed"] += computed
        self.calls["units_total"] += total


class SparseGatedFFN(nn.Module, _CountsPaths):
    """A gated FFN, down(act(gate(x)) * up(x)), computing only the active hidden units.

    Holds the original gate/up/down Linears and activation under their original attribute names, so the
    ``state_dict`` keys are those of the FFN it replaces.
    """

    def __init__(self, ffn: FFN, mode: str = "exact", predictor: nn.Module | None = None, max_active: float = 1.0):
        super().__init__()
        names = _child_names(ffn)
        for role, attr in names.items():
            self.add_module(attr, {"gate": ffn.gate, "up": ffn.up, "down": ffn.down, "act": ffn.act}[role])
        self._roles = tuple(names[role] for role in ("gate", "up", "down", "act"))  # attribute names, in this order
        self.mode, self.max_active = mode, max_active
        # not registered as a submodule: the predictor is not part of the model's weights (state_dict)
        object.__setattr__(self, "predictor", predictor)
        _neuron_major(ffn.down)
        self._reset_counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down, act = map(self._modules.__getitem__, self._roles)  # per token: the cheapest lookup
        tokens = x.reshape(-1, x.shape[-1])
        hidden = down.in_features
        limit = int(self.max_active * hidden)
        if self.mode == "exact":
            threshold = _fusable_threshold(act)
            a = gate(tokens) if threshold is not None else act(gate(tokens))
            out, count, path = gated_down(tokens, a, up.weight, up.bias, down.weight.t(), limit, threshold)
            if out is None and threshold is not None:
                a = act(a)
        else:
            index = self.predictor.predict(tokens).any(0).nonzero().squeeze(1)
            out, count = None, index.numel()
            if count <= limit:
                path = backend(tokens, gate.weight, up.weight, down.weight)
                h = act(_gathered(tokens, gate, index)) * _gathered(tokens, up, index)
                out = scatter_matmul(h, down.weight.t(), index)
        if out is None:
            self._count("dense", hidden, hidden)
            if self.mode != "exact":
                a = act(gate(tokens))
            return down(a * up(tokens)).reshape(*x.shape[:-1], down.out_features)
        if down.bias is not None:
            out = out + down.bias
        self._count(_PATH_NAMES[path], count, hidden)
        return out.reshape(*x.shape[:-1], down.out_features)


class SparseInputLinear(nn.Linear, _CountsPaths):
    """The down Linear of a plain FFN, skipping the input units that are zero for every token of the call."""

    def __init__(self, linear: nn.Linear, max_active: float = 1.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _neuron_major(linear)
        self.weight, self.bias = linear.weight, linear.bias
        self.max_active = max_active
        self._reset_counts()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.reshape(-1, self.in_features)
        out, count, path = input_sparse_down(tokens, self.weight.t(), int(self.max_active * self.in_features))
        if out is None:
            self._count("dense", self.in_features, self.in_features)
            return F.linear(h, self.weight, self.bias)
        if self.bias is not None:
            out = out + self.bias
        self._count(_PATH_NAMES[path], count, self.in_features)
        return out.reshape(*h.shape[:-1], self.out_features)


def _gathered(tokens: torch.Tensor, linear: nn.Linear, index: torch.Tensor) -> torch.Tensor:
    out = gather_matmul(tokens, linear.weight, index)
    return out if linear.bias is None else out + linear.bias[index]


def _fusable_threshold(act: nn.Module) -> float | None:
    """The threshold of a ReLU/FATReLU the exact kernel can apply itself, or None to call ``act`` (Top-k, or
    an activation with hooks, e.g. from `measure_sparsity`, which must see it run)."""
    if act._forward_hooks or act._forward_pre_hooks or type(act) not in _ELEMENTWISE:
        return None
    return getattr(act, "threshold", 0.0)


def _child_names(ffn: FFN) -> dict[str, str]:
    """Attribute names, on the FFN's own module, of its gate/up/down Linears and its activation."""
    wanted = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}
    names = {role: name for role, module in wanted.items() for name, child in ffn.module.named_children()
             if child is module}
    missing = sorted(set(wanted) - set(names))
    if missing or ffn.act_parent is not ffn.module:
        raise ValueError(f"{ffn.name or type(ffn.module).__name__}: sparse inference of a gated FFN needs its "
                         f"gate, up, down and activation as direct children of {type(ffn.module).__name__}")
    return {**names, "act": ffn.act_attr}


def _activation_kind(act: nn.Module) -> str | None:
    """"elementwise" (ReLU/FATReLU), "topk" (apply_topk's wrapper), or None (not sparse: GELU, SiLU, ...)."""
    if isinstance(act, _ELEMENTWISE):
        return "elementwise"
    if isinstance(act, nn.Sequential) and len(act) == 2 and isinstance(act[1], TopK):
        return "topk"
    return None


def _validate(model: nn.Module, ffns: list[FFN], mode: str, predictors, specs) -> None:
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if mode == "predictor" and predictors is None:
        raise ValueError("mode='predictor' needs predictors= (see leanformer.sparsity.train_predictors)")
    if mode == "exact" and predictors is not None:
        raise ValueError("predictors= is only used by mode='predictor'")
    if hasattr(predictors, "check_fits"):  # a Predictors set: shapes must match the model's FFNs
        predictors.check_fits(model, specs)
    for ffn in ffns:
        where = ffn.name or type(ffn.module).__name__
        kind = _activation_kind(ffn.act)
        if kind is None:
            raise ValueError(f"{where}: activation {type(ffn.act).__name__} is not sparse; sparse inference needs "
                             "ReLU, FATReLU or Top-k (leanformer.relufy / prosparse / apply_topk first)")
        if mode == "predictor":
            if not ffn.gated:
                raise ValueError(f"{where}: mode='predictor' supports gated FFNs (LLaMA/Mistral/Qwen2); "
                                 f"use mode='exact' for {type(ffn.module).__name__}")
            if kind != "elementwise":
                raise ValueError(f"{where}: mode='predictor' needs an elementwise activation (ReLU/FATReLU): "
                                 "Top-k needs every unit's value")
            if ffn.name not in predictors:
                raise ValueError(f"predictors have no entry for FFN {ffn.name!r}")
        if ffn.gated:
            _child_names(ffn)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def calibrate_max_active(ffn: FFN, mode: str = "exact", fractions: Iterable[float] = _CALIBRATION_FRACTIONS,
                         runs: int = 5) -> float:
    """Largest fraction of active units at which ``mode``'s sparse path of ``ffn`` beats its dense one here (batch 1).

    Times, with ``ffn``'s own weights and random active sets, the dense FFN against the sparse path at each
    fraction (in increasing order) and stops at the first fraction where sparse is not faster. In predictor mode
    the predictor itself is left out: it has run before the choice is made. Returns 0.0 when sparse never pays
    (every call then runs dense).
    """
    _neuron_major(ffn.down)
    weight, hidden = ffn.down.weight, ffn.hidden_features
    x = torch.randn(1, ffn.up.in_features, dtype=weight.dtype, device=weight.device)
    if ffn.gated:
        dense = lambda: F.linear(F.linear(x, ffn.gate.weight) * F.linear(x, ffn.up.weight), weight)
    else:
        h = torch.rand(1, hidden, dtype=weight.dtype, device=weight.device)
        dense = lambda: F.linear(h, weight)
    dense_time = time_interleaved({"dense": dense}, runs)["dense"]["median_s"]
    best = 0.0
    for fraction in sorted(fractions):
        keep = torch.zeros(1, hidden, dtype=torch.bool, device=weight.device)
        keep[0, torch.randperm(hidden, device=weight.device)[: max(1, int(fraction * hidden))]] = True
        if not ffn.gated:
            sparse = lambda kept=h * keep: input_sparse_down(kept, weight.t(), hidden)
        elif mode == "exact":
            sparse = lambda keep=keep: gated_down(
                x, F.linear(x, ffn.gate.weight) * keep, ffn.up.weight, None, weight.t(), hidden)
        else:
            index = keep[0].nonzero().squeeze(1)
            sparse = lambda index=index: scatter_matmul(
                gather_matmul(x, ffn.gate.weight, index) * gather_matmul(x, ffn.up.weight, index), weight.t(), index)
        if time_interleaved({"sparse": sparse}, runs)["sparse"]["median_s"] >= dense_time:
            break
        best = fraction
    return best


def sparsify_for_inference(model: nn.Module, mode: str = "exact", predictors=None, *,
                           max_active: float | str = "auto", specs: Iterable[FFNSpec] | None = None) -> nn.Module:
    """Swap every FFN of ``model`` for its sparse-inference form, in place; return ``model``.

    ``mode="exact"`` gives the dense outputs (up to float rounding); ``mode="predictor"`` uses ``predictors``
    (a `Predictors` with one entry per FFN name) to choose the units of gated FFNs. ``max_active`` is the
    largest fraction of hidden units a call may compute sparsely before it runs dense instead; "auto"
    measures it per FFN shape and mode on this machine (`calibrate_max_active`, a second or so per shape). Everything
    is validated before the model is touched. Works under ``model.generate()``; use `inference_report` to see
    which path ran.
    """
    if any(isinstance(m, (SparseGatedFFN, SparseInputLinear)) for m in model.modules()):
        raise ValueError("model already has sparse-inference FFNs (sparsify_for_inference was applied before)")
    if not (max_active == "auto" or (isinstance(max_active, (int, float)) and not isinstance(max_active, bool)
                                     and 0.0 <= max_active <= 1.0)):
        raise ValueError(f"max_active must be 'auto' or a fraction in [0, 1], got {max_active!r}")
    ffns = find_ffns(model, specs)
    _validate(model, ffns, mode, predictors, specs)
    calibrated: dict[tuple, float] = {}
    for ffn in ffns:
        limit = max_active
        if max_active == "auto":
            key = (ffn.gated, ffn.up.in_features, ffn.hidden_features, ffn.down.out_features, ffn.down.weight.dtype)
            if key not in calibrated:
                calibrated[key] = calibrate_max_active(ffn, mode)
            limit = calibrated[key]
        if ffn.gated:
            _replace(model, ffn.name, SparseGatedFFN(ffn, mode, predictors[ffn.name] if predictors else None, limit))
        else:
            down_name = next(name for name, module in ffn.module.named_modules() if module is ffn.down)
            _replace(ffn.module, down_name, SparseInputLinear(ffn.down, limit))
    return model


def inference_report(model: nn.Module, reset: bool = False) -> dict[str, dict]:
    """Per sparse FFN module: its calls per path ("sparse-native", "sparse-torch", "dense"), the mean
    fraction of hidden units computed, and its ``max_active``; ``reset`` then zeroes the counts."""
    report = {}
    for name, module in model.named_modules():
        if isinstance(module, (SparseGatedFFN, SparseInputLinear)):
            calls = dict(module.calls)
            computed, total = calls.pop("units_computed", 0), calls.pop("units_total", 0)
            report[name] = {"calls": calls, "computed_fraction": computed / total if total else None,
                            "max_active": module.max_active}
            if reset:
                module._reset_counts()
    return report

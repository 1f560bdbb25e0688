"""Sparse FFN inference: skip the zero hidden units of ReLU-family FFNs, exactly or with predictors.

A ReLU/FATReLU FFN (after `relufy` or `prosparse`) leaves most hidden units of a token at zero, and a zero
unit contributes nothing to the down projection. ProSparse (Song et al. 2024) turns this into speed on GPU;
PowerInfer (Song et al. 2023) and Deja Vu (Liu et al. 2023) predict the active units from the FFN input with
small per-layer predictors so that the gate, up and down projections are all computed for them only.
`sparsify_for_inference` swaps every FFN found by `find_ffns` for a sparse one, in place:

* ``mode="exact"`` — gated FFNs (LLaMA/Mistral/Qwen2, T5 gated, timm SwiGLU) whose module holds separate gate,
  up and down Linears: the gate is computed densely, then only the active rows of up and of down (neuron-major).
  Every other FFN (BERT, OPT, GPT-2's Conv1D, ViT/Swin `Mlp`, 1x1 Conv2d `ConvMlp`, MS-MLP, a fused gate/up as in
  Phi-3, or an FFN found by structure): up is dense, and the down projection is replaced by one that skips the
  units zero for every token (`SparseInputLinear`, `SparseInputConv1D`, `SparseInputConv2d`). Outputs equal the
  dense FFN up to float rounding.
* ``mode="predictor"`` — gated FFNs: a `Predictors` set (see `predictor.py`) chooses the units, and gate, up and
  down are computed for those only. Units the predictor misses are lost (approximate); units it adds in
  excess are zeroed by the activation (harmless).

A batch of tokens shares one set of units, the union of theirs; when the union is larger than ``max_active``
(a fraction of the hidden units) the layer runs dense. ``max_active="auto"`` measures, for each FFN shape on
this machine, the largest active fraction at which the sparse path is still faster than the dense one, for the
compiled kernels and for the PyTorch sparse path, and keeps the better of the two, once per machine: the result
is cached (`leanformer._tuning`; `leanformer tune` forgets it).
Each swapped module counts which path ran (`inference_report`); nothing falls back silently. Under autocast
(bf16 or fp16, CPU or GPU) the sparse products run in autocast's dtype as the dense layers would; only inputs
whose dtype differs from the weights' without autocast run dense (and torch raises its own error).
The down weight is re-laid out neuron-major *in place* (the parameter becomes a transposed view of a
contiguous (hidden, out) tensor), so memory and ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_int, is_real
from .._native import source_digest
from .._timing import time_interleaved
from .._tuning import tuned
from ._positions import PositionTracker
from .activations import FATReLU, TopK
from .ffn import FFN, FFNSpec, check_ffn_selection, layer_kind, refuse_fused_experts, selected_ffns
from .kernels import KERNEL_SOURCE, backend, gated_down, gather_matmul, input_sparse_down, scatter_matmul

__all__ = ["INFERENCE_MODES", "SparseGatedFFN", "SparseInferenceConfig", "SparseInputConv1D", "SparseInputConv2d",
           "SparseInputLinear", "calibrate_max_active", "desparsify", "inference_report", "sparsify_for_inference"]

INFERENCE_MODES = ("exact", "predictor")
_ELEMENTWISE = (nn.ReLU, FATReLU)
# as reported by inference_report
_PATH_NAMES = {"native": "sparse-native", "torch": "sparse-torch", "triton": "sparse-triton"}
_CALIBRATION_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _neuron_major(layer: nn.Module) -> None:
    """Store a down projection's weight so that its (hidden, out) transpose is contiguous: each hidden unit's
    weights one row. The parameter keeps its shape (a view of the new storage), so ``state_dict`` is unchanged;
    a transformers Conv1D already stores (in, out)."""
    kind = layer_kind(layer)
    matrix = kind.weight(layer)
    if not matrix.t().is_contiguous():
        weight_t = matrix.detach().t().contiguous()
        layer.weight = nn.Parameter(kind.as_param(weight_t.t()), requires_grad=layer.weight.requires_grad)


def _compute_dtype(tokens: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a sparse path computes in: autocast's when autocast is on for the tokens' device (a Linear would
    compute in it), else the weight's. None when the tokens' dtype is not the weight's without autocast: the
    dense layer then runs, and raises torch's own error."""
    device = tokens.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype if tokens.dtype == weight.dtype else None


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
    ``state_dict`` keys are those of the FFN it replaces. Under autocast (bf16/fp16) the sparse products run in
    autocast's dtype, as the Linears would.
    """

    def __init__(self, ffn: FFN, mode: str = "exact", predictor: nn.Module | None = None, max_active: float = 1.0,
                 native: bool = True, exact_prefix: int = 0, positions: PositionTracker | None = None):
        super().__init__()
        names = _gated_layout(ffn)
        if names is None:
            raise ValueError(f"{ffn.name or type(ffn.module).__name__}: {_GATED_LAYOUT}")
        for role, attr in names.items():
            self.add_module(attr, {"gate": ffn.gate, "up": ffn.up, "down": ffn.down, "act": ffn.act}[role])
        self._roles = tuple(names[role] for role in ("gate", "up", "down", "act"))  # attribute names, in this order
        self.mode, self.max_active, self.native = mode, max_active, native
        # not registered as a submodule: the predictor is not part of the model's weights (state_dict)
        object.__setattr__(self, "predictor", predictor)
        self.exact_prefix, self.positions = exact_prefix, positions
        _neuron_major(ffn.down)
        self._reset_counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        exact = self._exact_rows(x)
        if exact is None or not exact.any():
            out = self._tokens_through(tokens)
        else:  # the exact prefix dense, the other tokens (if any) through their predicted units
            first = self._tokens_through(tokens[exact], dense=True)
            out = first.new_empty(tokens.shape[0], first.shape[1])
            out[exact] = first
            if not exact.all():
                out[~exact] = self._tokens_through(tokens[~exact]).to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _tokens_through(self, tokens: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """The FFN of (n, features) tokens, counting the path that ran."""
        gate, up, down, act = map(self._modules.__getitem__, self._roles)  # per token: the cheapest lookup
        hidden = down.in_features
        dtype = None if dense else _compute_dtype(tokens, up.weight)
        out = a = None
        if dtype is not None:
            tokens = tokens.to(dtype)
            run = self._exact if self.mode == "exact" else self._predicted
            out, a, count, path = run(tokens, gate, up, down, act, int(self.max_active * hidden), self.native)
        if out is None:
            self._count("dense", hidden, hidden)
            if a is None:
                a = act(gate(tokens))
            return down(a * up(tokens))
        if down.bias is not None:
            out = out + down.bias.to(out.dtype)
        self._count(_PATH_NAMES[path], count, hidden)
        return out

    def _exact_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Predictor mode: which tokens of ``x`` sit in the first ``exact_prefix`` positions of their sequence
        (None when there is no exact prefix or the positions are unknown)."""
        if self.mode != "predictor" or self.exact_prefix == 0 or self.positions is None:
            return None
        return self.positions.below(self.exact_prefix, x.shape[:-1], x.device)

    @staticmethod
    def _exact(tokens, gate, up, down, act, limit: int, native: bool) -> tuple:
        """(out or None, act(gate(x)) if computed, active units, backend): gate dense, up and down sparse."""
        threshold = _fusable_threshold(act)
        a = gate(tokens) if threshold is not None else act(gate(tokens))
        out, count, path = gated_down(tokens, a, up.weight, up.bias, down.weight.t(), limit, threshold, native)
        if out is None and threshold is not None:
            a = act(a)
        return out, a, count, path

    def _predicted(self, tokens, gate, up, down, act, limit: int, native: bool) -> tuple:
        """(out or None, None, predicted units, backend): gate, up and down for the predicted units only."""
        index = self.predictor.predict(tokens).any(0).nonzero().squeeze(1)
        if index.numel() > limit:
            return None, None, index.numel(), "torch"
        path = backend(tokens, gate.weight, up.weight, down.weight, native=native)
        h = act(_gathered(tokens, gate, index, native)) * _gathered(tokens, up, index, native)
        return scatter_matmul(h, down.weight.t(), index, native), None, index.numel(), path


class _SparseInput(_CountsPaths):
    """The forward shared by the sparse down projections of `sparsify_for_inference`: the units zero for every
    token of the call are skipped; each layer type says how its input becomes (tokens, units) rows and back."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens(h)
        weight_t = self._weight_t()
        hidden = weight_t.shape[0]
        dtype = None if tokens is None else _compute_dtype(tokens, weight_t)
        out = None
        if dtype is not None:
            out, count, path = input_sparse_down(tokens.to(dtype), weight_t, int(self.max_active * hidden),
                                                 self.native)
        if out is None:
            self._count("dense", hidden, hidden)
            return self._dense(h)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        self._count(_PATH_NAMES[path], count, hidden)
        return self._from_tokens(out, h)


class SparseInputLinear(_SparseInput, nn.Linear):
    """The down Linear of an FFN, skipping the input units that are zero for every token of the call."""

    def __init__(self, linear: nn.Linear, max_active: float = 1.0, native: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _neuron_major(linear)
        self.weight, self.bias = linear.weight, linear.bias
        self.max_active, self.native = max_active, native
        self._reset_counts()

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, self.in_features)

    def _weight_t(self) -> torch.Tensor:
        return self.weight.t()

    def _dense(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias)

    def _from_tokens(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return out.reshape(*h.shape[:-1], self.out_features)


class SparseInputConv1D(_SparseInput, nn.Module):
    """The down projection of a GPT-2 FFN (transformers' Conv1D, weight (in, out): already neuron-major),
    skipping the input units that are zero for every token of the call."""

    projection_kind = "Conv1D"  # read as the layer it replaces

    def __init__(self, conv: nn.Module, max_active: float = 1.0, native: bool = True):
        nn.Module.__init__(self)
        self.nx, self.nf = conv.weight.shape
        self.weight, self.bias = conv.weight, conv.bias
        self.max_active, self.native = max_active, native
        self._reset_counts()

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, self.nx)

    def _weight_t(self) -> torch.Tensor:
        return self.weight

    def _dense(self, h: torch.Tensor) -> torch.Tensor:  # as Conv1D computes it
        rows = h.reshape(-1, self.nx)
        out = rows @ self.weight if self.bias is None else torch.addmm(self.bias, rows, self.weight)
        return out.view(*h.shape[:-1], self.nf)

    def _from_tokens(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return out.reshape(*h.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


_CONV2D_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                      "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class SparseInputConv2d(_SparseInput, nn.Conv2d):
    """The 1x1 Conv2d down projection of an FFN on NCHW maps (timm ConvMlp, Mlp(use_conv=True)), skipping the
    channels that are zero at every position of the call; an unbatched (C, H, W) input runs dense."""

    def __init__(self, conv: nn.Conv2d, max_active: float = 1.0, native: bool = True):
        nn.Module.__init__(self)
        for attr in _CONV2D_ATTRIBUTES:
            setattr(self, attr, getattr(conv, attr))
        _neuron_major(conv)
        self.weight, self.bias = conv.weight, conv.bias
        self.max_active, self.native = max_active, native
        self._reset_counts()

    def _tokens(self, h: torch.Tensor) -> torch.Tensor | None:
        return h.movedim(1, -1).reshape(-1, self.in_channels) if h.dim() == 4 else None

    def _weight_t(self) -> torch.Tensor:
        return self.weight[:, :, 0, 0].t()

    def _dense(self, h: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(h, self.weight, self.bias)

    def _from_tokens(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = out.reshape(h.shape[0], *h.shape[2:], self.out_channels).movedim(-1, 1)
        return out.contiguous() if h.is_contiguous() else out  # the memory format a conv of ``h`` returns


# LayerKind name of an FFN's down projection -> its sparse replacement
_SPARSE_DOWN = {"Linear": SparseInputLinear, "Conv1D": SparseInputConv1D, "Conv2d": SparseInputConv2d}


def _gathered(tokens: torch.Tensor, linear: nn.Linear, index: torch.Tensor, native: bool) -> torch.Tensor:
    out = gather_matmul(tokens, linear.weight, index, native)
    return out if linear.bias is None else out + linear.bias[index].to(out.dtype)


def _fusable_threshold(act: nn.Module) -> float | None:
    """The threshold of a ReLU/FATReLU the exact kernel can apply itself, or None to call ``act`` (Top-k, or
    an activation with hooks, e.g. from `measure_sparsity`, which must see it run)."""
    if act._forward_hooks or act._forward_pre_hooks or type(act) not in _ELEMENTWISE:
        return None
    return getattr(act, "threshold", 0.0)


_GATED_LAYOUT = ("the whole-FFN sparse path needs separate gate and up Linears, a Linear down projection and the "
                 "activation as direct children of a module known from the table or specs, with nothing else "
                 "computing in it (dropout and identity aside)")
_EXPERTS_REASON = ("exact sparse inference of fused experts, which gather each expert's tokens, is out of scope; "
                   "measure_sparsity, relufy, apply_topk and prosparse do support them")
_INERT = (nn.Dropout, nn.Identity)  # children a gated FFN may hold besides its layers: no-ops in eval


def _gated_layout(ffn: FFN) -> dict[str, str] | None:
    """Attribute names, on the FFN's own module, of its gate/up/down Linears and its activation, if
    `SparseGatedFFN` may replace that module (see ``_GATED_LAYOUT``: it computes down(act(gate(x)) * up(x)) and
    nothing more); None otherwise, and then only the down projection is made sparse (exact all the same)."""
    if not ffn.gated or ffn.fused or ffn.found_by == "structure" or ffn.act_parent is not ffn.module \
            or any(layer_kind(layer).name != "Linear" for layer in (ffn.gate, ffn.up, ffn.down)) \
            or next(ffn.module.parameters(recurse=False), None) is not None:
        return None
    wanted = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}
    names = {}
    for name, child in ffn.module.named_children():
        role = next((role for role, layer in wanted.items() if child is layer), None)
        if role is not None:
            names[role] = name
        elif name != ffn.act_attr and not isinstance(child, _INERT):
            return None
    return {**names, "act": ffn.act_attr} if len(names) == 3 else None


def _activation_kind(act: nn.Module) -> str | None:
    """"elementwise" (ReLU/FATReLU), "topk" (apply_topk's wrapper), or None (not sparse: GELU, SiLU, ...)."""
    if isinstance(act, _ELEMENTWISE):
        return "elementwise"
    if isinstance(act, nn.Sequential) and len(act) == 2 and isinstance(act[1], TopK):
        return "topk"
    return None


def _validate(model: nn.Module, ffns: list[FFN], mode: str, predictors, specs) -> None:
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
            if _gated_layout(ffn) is None:
                raise ValueError(f"{where}: mode='predictor' supports gated FFNs (LLaMA/Mistral/Qwen2): "
                                 f"{_GATED_LAYOUT}; use mode='exact' for {type(ffn.module).__name__}")
            if kind != "elementwise":
                raise ValueError(f"{where}: mode='predictor' needs an elementwise activation (ReLU/FATReLU): "
                                 "Top-k needs every unit's value")
            if ffn.name not in predictors:
                raise ValueError(f"predictors have no entry for FFN {ffn.name!r}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def calibrate_max_active(ffn: FFN, mode: str = "exact", fractions: Iterable[float] = _CALIBRATION_FRACTIONS,
                         runs: int = 5, native: bool = True) -> float:
    """Largest fraction of active units at which ``mode``'s sparse path of ``ffn`` beats its dense one here (batch 1).

    Times, with ``ffn``'s own weights and random active sets, the dense FFN against the sparse path at each
    fraction (in increasing order) and stops at the first fraction where sparse is not faster. In predictor mode
    the predictor itself is left out: it has run before the choice is made. Returns 0.0 when sparse never pays
    (every call then runs dense). ``native=False`` times the PyTorch sparse path instead of the compiled one.
    """
    gated = _gated_layout(ffn) is not None
    _neuron_major(ffn.down)
    weight, hidden = ffn.weight("down"), ffn.hidden_features
    x = torch.randn(1, ffn.in_features, dtype=weight.dtype, device=weight.device)
    if gated:
        gate_weight, up_weight = ffn.weight("gate"), ffn.weight("up")
        dense = lambda: F.linear(F.linear(x, gate_weight) * F.linear(x, up_weight), weight)
    else:
        h = torch.rand(1, hidden, dtype=weight.dtype, device=weight.device)
        dense = lambda: F.linear(h, weight)
    dense_time = time_interleaved({"dense": dense}, runs)["dense"]["median_s"]
    best = 0.0
    for fraction in sorted(fractions):
        keep = torch.zeros(1, hidden, dtype=torch.bool, device=weight.device)
        keep[0, torch.randperm(hidden, device=weight.device)[: max(1, int(fraction * hidden))]] = True
        if not gated:
            sparse = lambda kept=h * keep: input_sparse_down(kept, weight.t(), hidden, native)
        elif mode == "exact":
            sparse = lambda keep=keep: gated_down(
                x, F.linear(x, gate_weight) * keep, up_weight, None, weight.t(), hidden, native=native)
        else:
            index = keep[0].nonzero().squeeze(1)
            sparse = lambda index=index: scatter_matmul(
                gather_matmul(x, gate_weight, index, native) * gather_matmul(x, up_weight, index, native),
                weight.t(), index, native)
        if time_interleaved({"sparse": sparse}, runs)["sparse"]["median_s"] >= dense_time:
            break
        best = fraction
    return best


_SPARSE_KERNELS = source_digest(KERNEL_SOURCE)


def _measured_sparse_path(ffn: FFN, mode: str, gated: bool) -> tuple[float, bool]:
    """(max_active, native) for this FFN's shape: `calibrate_max_active` of the compiled and of the PyTorch sparse
    path, the one sparse for more of the range kept (the compiled one on a tie). Measured once per machine on the
    CPU and cached (`_tuning`), keyed by everything the crossover depends on: mode, layout, shape, dtype, whether
    the kernels are built and their source."""
    weight = ffn.weight("down")
    if weight.device.type != "cpu":  # the machine key describes the CPU only; off the CPU only PyTorch runs
        return calibrate_max_active(ffn, mode), True
    built = backend(weight.detach()) == "native"
    key = (f"{mode}/{'gated' if gated else 'plain'}/{ffn.in_features}x{ffn.hidden_features}x{ffn.out_features}/"
           f"{str(weight.dtype).removeprefix('torch.')}/{'native' if built else 'torch'}@{_SPARSE_KERNELS}")

    def measure() -> dict:
        crossover = {"torch": calibrate_max_active(ffn, mode, native=False)}
        if built:
            crossover["native"] = calibrate_max_active(ffn, mode)
        fastest = max(crossover, key=lambda name: (crossover[name], name == "native"))
        return {"choice": crossover[fastest], "backend": fastest, "crossover_by_backend": crossover}

    entry = tuned("sparse_path", key, measure)
    return float(entry["choice"]), entry["backend"] == "native"


@dataclass(frozen=True)
class SparseInferenceConfig:
    """How `sparsify_for_inference` computes the FFNs.

    mode: "exact" gives the dense outputs (up to float rounding); "predictor" lets `Predictors` choose the units
        of gated FFNs (approximate). max_active: the largest fraction of hidden units a call may compute sparsely
        before it runs dense instead; "auto" measures it per FFN shape and mode on this machine
        (`calibrate_max_active`, a second or so per shape, cached). exact_prefix: in predictor mode, the first
        positions of every sequence (read from the model call's ``position_ids`` or its KV cache) computed
        densely: the first token is the attention sink, and predicting its units ruins the tokens after it (see
        `_positions`). specs: the FFN table `find_ffns` reads (default `FFN_SPECS`). target_modules: the FFNs to
        sparsify by module name (names or name endings, or one regex, as every config selects modules; None: all).
    """

    mode: str = "exact"
    max_active: float | str = "auto"
    exact_prefix: int = 1
    specs: tuple[FFNSpec, ...] | None = None
    target_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {', '.join(INFERENCE_MODES)}")
        if self.max_active != "auto" and not (is_real(self.max_active) and 0 <= self.max_active <= 1):
            raise ValueError(f"max_active={self.max_active!r}: expected 'auto' or a fraction in [0, 1]")
        check_int("exact_prefix", self.exact_prefix, minimum=0)
        check_ffn_selection(self)


def sparsify_for_inference(model: nn.Module, config: SparseInferenceConfig = SparseInferenceConfig(),
                           predictors=None) -> nn.Module:
    """Swap every FFN of ``model`` for its sparse-inference form as ``config`` says, in place; return ``model``.

    ``predictors`` (mode "predictor" only): a `Predictors` with one entry per FFN name, see `train_predictors`.
    Everything is validated before the model is touched. Works under ``model.generate()``; use `inference_report`
    to see which path ran and `desparsify` to undo.
    """
    if not isinstance(config, SparseInferenceConfig):
        raise ValueError(f"sparsify_for_inference(model, config): expected a SparseInferenceConfig, got {config!r}")
    if any(isinstance(m, _CountsPaths) for m in model.modules()):
        raise ValueError("model already has sparse-inference FFNs (sparsify_for_inference was applied before)")
    mode, max_active, exact_prefix, specs = config.mode, config.max_active, config.exact_prefix, config.specs
    ffns = selected_ffns(model, specs, config.target_modules)
    refuse_fused_experts(ffns, "sparsify_for_inference", _EXPERTS_REASON)
    _validate(model, ffns, mode, predictors, specs)
    calibrated: dict[tuple, tuple[float, bool]] = {}
    positions = PositionTracker(model) if mode == "predictor" and exact_prefix else None
    for ffn in ffns:
        gated = _gated_layout(ffn) is not None
        limit, native = max_active, True
        if max_active == "auto":
            key = (gated, ffn.in_features, ffn.hidden_features, ffn.out_features, ffn.down.weight.dtype)
            if key not in calibrated:
                calibrated[key] = _measured_sparse_path(ffn, mode, gated)
            limit, native = calibrated[key]
        if gated:
            sparse, name = SparseGatedFFN(ffn, mode, predictors[ffn.name] if predictors else None, limit, native,
                                          exact_prefix, positions), ffn.name
            original = ffn.module
        else:
            down_name = next(name for name, module in ffn.module.named_modules() if module is ffn.down)
            sparse = _SPARSE_DOWN[layer_kind(ffn.down).name](ffn.down, limit, native)
            name, original = f"{ffn.name}.{down_name}" if ffn.name else down_name, ffn.down
        object.__setattr__(sparse, "original", original)  # for desparsify; not a submodule (nor in state_dict)
        _replace(model, name, sparse)
    return model


def desparsify(model: nn.Module) -> nn.Module:
    """Undo `sparsify_for_inference`, in place; return ``model``: every sparse module gives its place back to the
    module it replaced, down weights are stored row-major again and the position hooks are removed, so the
    model is the one given to `sparsify_for_inference` (same modules, weights, outputs). ValueError if there is
    nothing to undo."""
    sparse = [(name, module) for name, module in model.named_modules() if isinstance(module, _CountsPaths)]
    if not sparse:
        raise ValueError(f"{type(model).__name__} has no sparse-inference modules (sparsify_for_inference was not "
                         "applied, or was undone)")
    for name, module in sparse:
        original = module.original
        down = original.get_submodule(module._roles[2]) if isinstance(module, SparseGatedFFN) else original
        if isinstance(down, (nn.Linear, nn.Conv2d)) and not down.weight.is_contiguous():
            down.weight = nn.Parameter(down.weight.detach().contiguous(), requires_grad=down.weight.requires_grad)
        if getattr(module, "positions", None) is not None:
            module.positions.remove()
        _replace(model, name, original)
    return model


def inference_report(model: nn.Module, reset: bool = False) -> dict[str, dict]:
    """Per sparse FFN module: its calls per path ("sparse-native", "sparse-triton", "sparse-torch", "dense"), the mean
    fraction of hidden units computed, and its ``max_active``; ``reset`` then zeroes the counts."""
    report = {}
    for name, module in model.named_modules():
        if isinstance(module, _CountsPaths):
            calls = dict(module.calls)
            # the Triton path counts on the device (no synchronisation per call): read the sum here, once
            computed, total = int(calls.pop("units_computed", 0)), calls.pop("units_total", 0)
            report[name] = {"calls": calls, "computed_fraction": computed / total if total else None,
                            "max_active": module.max_active}
            if reset:
                module._reset_counts()
    return report

"""Activation-compressed training: exact forward, low-bit activations saved for backward.

Mesa (Pan et al., "Mesa: A Memory-saving Training Framework for Transformers", 2021) keeps the
forward exact but stores what autograd saves for backward in 8 bits, with per-head groups and
running-estimate ranges; ActNN (Chen et al. 2021) and GACT (Liu et al. 2022) do the same for
conv nets and through saved-tensor hooks. Here one mechanism covers any `nn.Module`:
`torch.autograd.graph.saved_tensors_hooks` sees every tensor any op keeps for backward (module or
functional call alike), so nothing has to be replaced by hand.

- The forward is untouched: only the copy kept for backward is quantised (8/4/2 bits, bit-packed),
  and ReLU outputs are kept as 1-bit masks, which is all their backward needs.
- Parameters and buffers, integer/bool tensors, tiny tensors, per-token statistics (last dim 1, such
  as LayerNorm's rstd) and tensors holding NaN/Inf are kept exact (so a NaN propagates into the
  gradient exactly as without compression).
- A tensor saved by several ops is stored once.
- Ranges per group: each tensor's own (default) or Mesa's running estimates, per site (module, op
  kind, order of the save within the module's forward); values outside a running range are
  clamped, never wrapped, and counted (`stats()`).
- Exclusion by op kind (`ops`) and by module name (`exclude_modules`, names or one regex).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .._targets import check_targets, selects
from . import quantize as Q
from ._tracking import ModuleTracker
from .measure import active_report, parameter_storages, storage_key

OP_KINDS = ("linear", "conv", "norm", "activation", "attention", "other")
_GROUPS = ("head", "channel", "tensor")

# functional calls (seen by a TorchFunctionMode) and leaf module classes -> op kind
_FUNCTION_KINDS = {
    "linear": "linear", "addmm": "linear",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "conv_transpose2d": "conv",
    "layer_norm": "norm", "group_norm": "norm", "batch_norm": "norm", "rms_norm": "norm",
    "gelu": "activation", "silu": "activation", "relu": "activation", "mish": "activation", "tanh": "activation",
    "sigmoid": "activation", "threshold": "activation",
    "softmax": "attention", "scaled_dot_product_attention": "attention", "matmul": "attention", "bmm": "attention",
    "__matmul__": "attention", "baddbmm": "attention", "einsum": "attention",
}
_MODULE_KINDS = (
    (nn.Linear, "linear"), ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d), "norm"),
    ((nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish), "activation"), (nn.Softmax, "attention"),
)
_RELU_FUNCTIONS = {"relu", "relu_", "threshold"}


# the named settings of the command line (`leanformer train --compress`, `leanformer profile --compress`): bits
COMPRESSION_PRESETS = {"none": None, "int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class CompressionConfig:
    """How activations saved for backward are stored.

    bits: 8, 4 or 2 per value (ReLU outputs always take 1 bit).
    group: "head" (one range per head for 4-D attention operands: q/k/v and attention maps; per channel
        for everything else), "channel", "tensor", or a group size (consecutive elements).
    range: "batch" (each tensor's own per-group min/max: nothing is clipped) or "running" (Mesa: an EMA
        of per-group min/max, set by the first batch; values outside are clamped). The default is
        "batch": with the short, high-learning-rate schedules of `leanformer train`, activations drift
        faster than the EMA follows; on the compact Swin, running ranges clipped 13% of all values
        (up to 50% of some tensors) after 20 steps and one of three int8 digits runs diverged.
    ema_decay: weight of the old running range per training forward (Mesa: 0.9).
    rounding: "stochastic" (unbiased) or "nearest".
    ops: op kinds to compress, from OP_KINDS.
    exclude_modules: the modules whose saved tensors stay exact, in the selection language of every config
        (`leanformer._targets`, PEFT's target_modules: names or name endings, or one regular expression).
    min_numel: tensors with fewer elements stay exact (not worth it).
    clip_stats_every: count values clipped by running ranges on one training forward in this many
        (counting costs three passes over every tensor); `stats()` reports the sampled fraction.
    """

    bits: int = 8
    group: str | int = "head"
    range: str = "batch"
    ema_decay: float = 0.9
    rounding: str = "stochastic"
    ops: tuple[str, ...] = OP_KINDS
    exclude_modules: str | tuple[str, ...] = ()
    min_numel: int = 1024
    clip_stats_every: int = 10

    def __post_init__(self) -> None:
        if self.bits not in (8, 4, 2):
            raise ValueError(f"bits={self.bits!r}: expected one of 8, 4, 2")
        if not (self.group in _GROUPS or (isinstance(self.group, int) and not isinstance(self.group, bool)
                                          and self.group > 0)):
            raise ValueError(f"group={self.group!r}: expected one of {_GROUPS} or a positive group size")
        if self.range not in ("running", "batch"):
            raise ValueError(f"range={self.range!r}: expected 'running' or 'batch'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r}: expected a number in [0, 1)")
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding={self.rounding!r}: expected 'stochastic' or 'nearest'")
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "exclude_modules", check_targets("exclude_modules", self.exclude_modules) or ())
        unknown = [op for op in self.ops if op not in OP_KINDS]
        if unknown:
            raise ValueError(f"ops={list(self.ops)!r}: unknown kind(s) {unknown}; expected kinds from {OP_KINDS}")
        if not isinstance(self.clip_stats_every, int) or self.clip_stats_every < 1:
            raise ValueError(f"clip_stats_every={self.clip_stats_every!r}: expected a positive integer")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel={self.min_numel!r}: expected an integer >= 0")

    @classmethod
    def from_name(cls, name: str) -> CompressionConfig | None:
        """One of `COMPRESSION_PRESETS` -> a config with those bits and defaults otherwise; 'none' -> None."""
        if name not in COMPRESSION_PRESETS:
            raise ValueError(f"compression {name!r}: expected one of {', '.join(COMPRESSION_PRESETS)}")
        bits = COMPRESSION_PRESETS[name]
        return None if bits is None else cls(bits=bits)


class _CurrentFunction(TorchFunctionMode):
    """Remembers the name of the torch function being run, so a saved tensor can be attributed to it."""

    def __init__(self):
        super().__init__()
        self.name: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        previous, self.name = self.name, getattr(func, "__name__", None)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.name = previous


@dataclass
class _Stored:
    """What the pack hook returns: a compressed tensor, a 1-bit mask, or the tensor itself."""

    kind: str  # "raw" | "quantized" | "mask" | "view" (another shape of a stored tensor)
    payload: object
    shape: torch.Size | None = None
    dtype: torch.dtype | None = None
    order: tuple[int, ...] | None = None  # quantized in this dim order (memory order of a permuted tensor)
    _unpacked: weakref.ref | None = field(default=None, repr=False)

    def unpack(self) -> torch.Tensor:
        if self.kind == "raw":
            return self.payload
        if self.kind == "view":
            return self.payload.unpack().view(self.shape)
        cached = self._unpacked() if self._unpacked is not None else None
        if cached is not None:  # the same tensor saved by two ops: decompress once
            return cached
        if self.kind == "mask":
            out = Q.unpack_mask(self.payload, self.shape).to(self.dtype)
        else:
            out = Q.dequantize(self.payload)
            if self.order is not None:  # back to the saved tensor's dim order and strides
                out = out.permute(tuple(sorted(range(len(self.order)), key=self.order.__getitem__)))
        self._unpacked = weakref.ref(out)
        return out


def _memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The dim order in which a non-contiguous but dense tensor is contiguous (channels-last: N, H, W, C), or None
    when x is contiguous already or not a permutation of a contiguous block (then quantising copies it)."""
    if x.is_contiguous():
        return None
    order = tuple(sorted(range(x.ndim), key=lambda d: (-x.stride(d), -x.shape[d])))
    return order if x.permute(order).is_contiguous() else None


class ActivationCompressor:
    """The state behind `compress_activations`: hooks, running ranges, dedup cache and statistics.

    It holds no reference to the model: its hooks hand it each module as that module runs (the model itself
    under the name ""), so copying one submodule of a compressed model does not copy the whole model. A deep
    copy or a pickle of the model copies the compressor with it (the hooks are objects, see `ModuleTracker`):
    the copy compresses through its own compressor, with the running ranges and counters of the original at
    copy time, and its stochastic rounding restarts from the seed taken at compression time.
    """

    def __init__(self, model: nn.Module, config: CompressionConfig):
        self.config = config
        self.running: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clipped = 0
        self.quantized_values = 0
        self.counted_values = 0
        self._forwards = -1  # training forwards seen; the first one (0) counts clipping
        self._training = False  # the model's mode in the forward being run
        self._excluded = 0
        self._save_index: dict[str, int] = {}
        self._seed = torch.initial_seed()
        self._reset_transient()
        self._tracker = ModuleTracker(model, on_enter=self._enter, on_exit=self._exit)

    def _reset_transient(self) -> None:
        """State that lives only within a forward or is a cache: rebuilt, never copied or pickled."""
        self._mode = _CurrentFunction()
        self._cache: dict[tuple, tuple[weakref.ref, _Stored]] = {}
        self._params: set = set()
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._generators: dict[torch.device, torch.Generator] = {}  # per device: a copy may live on another one
        self._pools: dict[torch.device, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        transient = ("_mode", "_cache", "_params", "_saved_hooks", "_generators", "_pools")
        return {key: value for key, value in self.__dict__.items() if key not in transient}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_transient()

    # -- entering and leaving the model's forward ---------------------------------------------------

    def _enter(self, name: str, module: nn.Module) -> None:
        if not name:  # the model itself
            self._training = module.training
            self._forwards += module.training
            self._params = parameter_storages(module)
            self._save_index.clear()
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _Stored.unpack)
            self._saved_hooks.__enter__()
            self._mode.__enter__()
        elif selects(self.config.exclude_modules, name):
            self._excluded += 1

    def _exit(self, name: str, module: nn.Module) -> None:
        if not name:
            self._mode.__exit__(None, None, None)
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None
            self._cache.clear()
        elif selects(self.config.exclude_modules, name):
            self._excluded -= 1

    # -- the pack hook -------------------------------------------------------------------------------

    def _op_kind(self, module: nn.Module | None) -> str:
        kind = _FUNCTION_KINDS.get(self._mode.name or "")
        if kind is None and module is not None:
            kind = next((k for cls, k in _MODULE_KINDS if isinstance(module, cls)), None)
        return kind or "other"

    def _keep(self, x: torch.Tensor, module: str) -> _Stored:
        report = active_report()
        if report is not None and storage_key(x) not in self._params:
            nbytes = x.untyped_storage().nbytes()
            report.record(module, ("raw", storage_key(x)), nbytes, nbytes, x.untyped_storage())
        return _Stored("raw", x)

    def pack(self, x: torch.Tensor) -> _Stored:
        module_name, module = self._tracker.current
        cfg = self.config
        if (self._excluded or not x.is_floating_point() or x.numel() < cfg.min_numel or x.shape[-1] == 1
                or storage_key(x) in self._params):
            return self._keep(x, module_name)  # last dim 1: per-token statistics such as LayerNorm's rstd
        kind = self._op_kind(module)
        if kind not in cfg.ops:
            return self._keep(x, module_name)
        # the running-range site is the save's position in its module's forward, counted for every save
        # (cache hits included) so that it names the same tensor in every forward
        index = self._save_index.get(module_name, 0)
        self._save_index[module_name] = index + 1
        if self._mode.name in _RELU_FUNCTIONS or isinstance(module, nn.ReLU):
            # ReLU's backward needs only where its output is positive; the mask serves that op alone
            stored = _Stored("mask", Q.pack_mask(x > 0), x.shape, x.dtype)
            nbytes = stored.payload.numel()
        else:
            # contiguous views of the same memory (e.g. a 4-D map and the 2-D view a Linear saves) share one copy
            layout = (x.numel(),) if x.is_contiguous() else (tuple(x.shape), x.stride())
            key = (storage_key(x), x.storage_offset(), layout, x.dtype, x._version)
            hit = self._cache.get(key)
            if hit is not None and hit[0]() is not None:
                return hit[1] if hit[1].shape == x.shape else _Stored("view", hit[1], x.shape, x.dtype)
            stored = self._quantize(x, (module_name, kind, index))
            if stored is None:  # NaN/Inf: keep exact so backward sees what it would without compression
                return self._keep(x, module_name)
            nbytes = stored.payload.nbytes()
            self._cache[key] = (weakref.ref(x), stored)
        report = active_report()
        if report is not None:
            report.record(module_name, ("stored", id(stored)), nbytes, x.numel() * x.element_size(), stored)
        return stored

    def _quantize(self, x: torch.Tensor, site: tuple) -> _Stored | None:
        cfg = self.config
        shape, order = x.shape, _memory_order(x)
        if order is not None:  # e.g. channels-last maps, transposed operands: quantise in memory order, no copy
            x = x.permute(order)
        # one range per head only for attention operands (B, heads, N, D); NHWC maps etc. per channel
        group = cfg.group if cfg.group != "head" or (x.ndim == 4 and site[1] == "attention") else "channel"
        lo, hi = Q.group_minmax(x, group)
        if not Q.ranges_are_finite(lo, hi):
            return None
        if cfg.range == "running" and not isinstance(group, int):
            site = (*site, tuple(lo.shape))
            if self._training:  # pack hooks run only when autograd saves, i.e. in a grad-enabled forward
                self.running[site] = Q.ema_update(self.running.get(site), (lo, hi), cfg.ema_decay)
            lo, hi = self.running.get(site, (lo, hi))
        stochastic = cfg.rounding == "stochastic"
        counting = self._forwards % cfg.clip_stats_every == 0
        q = Q.quantize(x, cfg.bits, group, lo=lo, hi=hi, stochastic=stochastic, generator=self._generator(x.device),
                       noise_pool=self._noise_pool(x.device) if stochastic else None, count_clipped=counting)
        if counting:
            self.clipped += int(q.clipped)
            self.counted_values += x.numel()
        self.quantized_values += x.numel()
        return _Stored("quantized", q, shape, x.dtype, order)

    def _generator(self, device: torch.device) -> torch.Generator:
        """A private RNG for stochastic rounding, so dropout and drop-path draw the same numbers as without
        compression (seeded from torch's seed at compression time: reproducible runs stay reproducible)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self._seed)
        return self._generators[device]

    def _noise_pool(self, device: torch.device) -> torch.Tensor | None:
        """Uniform noise read at random offsets for stochastic rounding: much cheaper than fresh draws.
        None where fused kernels run (they make their own noise)."""
        if Q.makes_own_noise(device):
            return None
        if device not in self._pools:
            self._pools[device] = Q.make_noise_pool(device, self._generator(device))
        return self._pools[device]

    def stats(self) -> dict:
        """Counters since compression started: values quantised, and of the values counted (one forward in
        `clip_stats_every`), how many running ranges clipped."""
        return {"quantized_values": self.quantized_values, "counted_values": self.counted_values,
                "clipped_values": self.clipped,
                "clipped_fraction": self.clipped / self.counted_values if self.counted_values else 0.0,
                "running_sites": len(self.running)}

    def remove(self) -> None:
        self._tracker.remove()


_ATTRIBUTE = "_leanformer_activation_compressor"


def compress_activations(model: nn.Module, config: CompressionConfig | None = None) -> nn.Module:
    """Store the activations `model` saves for backward compressed, in place; returns `model`.

    The forward result is unchanged. Raises ValueError if `model` is already compressed (undo with
    `decompress_activations` first): compressing twice would quantise twice.
    """
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(model).__name__} is already compressed; call decompress_activations(model) first")
    compressor = ActivationCompressor(model, config or CompressionConfig())
    object.__setattr__(model, _ATTRIBUTE, compressor)  # a plain attribute: not a submodule, not in the state dict
    return model


def decompress_activations(model: nn.Module) -> nn.Module:
    """Undo `compress_activations`: remove the hooks; saved activations are exact again."""
    compressor = getattr(model, _ATTRIBUTE, None)
    if compressor is None:
        raise ValueError(f"{type(model).__name__} is not compressed")
    compressor.remove()
    object.__delattr__(model, _ATTRIBUTE)
    return model


def compression_of(model: nn.Module) -> ActivationCompressor | None:
    """The compressor attached to `model`, or None."""
    return getattr(model, _ATTRIBUTE, None)


def compression_stats(model: nn.Module) -> dict:
    compressor = compression_of(model)
    if compressor is None:
        raise ValueError(f"{type(model).__name__} is not compressed")
    return compressor.stats()



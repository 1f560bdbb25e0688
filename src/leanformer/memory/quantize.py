"""Low-bit quantisation of saved activations: the tensor core of activation-compressed training.

The ideas come from Mesa (Pan et al. 2021, "Mesa: A Memory-saving Training Framework for Transformers"):
8-bit affine codes with one range per group (per attention head, or per channel chunk), stochastic rounding
so that the dequantised activation is unbiased, and running (EMA) estimates of each group's range; and from
ActNN (Chen et al. 2021) and GACT (Liu et al. 2022): groups of a fixed size over the flattened tensor, 2/4/8-bit
codes packed into bytes, per-batch min/max ranges. Unlike Mesa's reference code, values outside a running range
are clamped (never wrapped modulo 2**bits) and counted, and the range used is snapshotted into the result.

Everything here is a pure function of tensors (no modules, no global state) and runs on CPU and GPU for fp32,
bf16 and fp16 inputs; statistics are fp32. On CPU the element-wise work is done in row chunks of about 2**19
elements so that temporaries stay in cache and are not fresh page-faulted allocations (about 3x faster than
whole-tensor temporaries on the benchmark shape); on GPU the whole tensor is one chunk.

The three passes (``group_minmax``, ``quantize``, ``dequantize``) and the 1-bit masks use fused kernels where
they apply: compiled C++ on the CPU when it can be built (``leanformer._native``; ``csrc/quantize.cpp``), Triton on
CUDA tensors (``_triton.py``; see ``leanformer._gpu``). Each is one pass over memory, with stochastic rounding from
counter-based noise instead of drawn noise. The PyTorch code below is the reference they are tested against and
the fallback everywhere else (no compiler, no Triton, ``LEANFORMER_NATIVE=0``, ``LEANFORMER_TRITON=0``).

Non-finite values: ``group_minmax`` propagates NaN/inf into the statistics of the group that holds them, and
the codes of such a group are meaningless (but never disturb other groups). Callers keep such tensors exact,
checking ``ranges_are_finite(lo, hi)`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .. import _gpu, _native

KERNEL_SOURCE = Path(__file__).parent / "csrc" / "quantize.cpp"  # the compiled fast path of this module

GroupSpec = str | int

__all__ = [
    "GroupSpec",
    "QuantizedTensor",
    "dequantize",
    "ema_update",
    "group_minmax",
    "group_reduce_dims",
    "make_noise_pool",
    "makes_own_noise",
    "pack_bits",
    "pack_mask",
    "quantize",
    "ranges_are_finite",
    "unpack_bits",
    "unpack_mask",
]

_ALLOWED_BITS = (8, 4, 2)
_NAMED_GROUPS = ("head", "channel", "tensor")
# Smallest step: the smallest normal fp32, so 1/step stays finite (a subnormal step would overflow it).
_MIN_STEP = torch.finfo(torch.float32).tiny
_CHUNK = 1 << 19  # elements per CPU chunk: fp32 temporaries of 2 MB stay in cache
# Values within this fraction of a step outside the range are rounding noise, not clipping.
_CLIP_SLACK = 1e-3


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in _ALLOWED_BITS:
        raise ValueError(f"bits must be one of {_ALLOWED_BITS}, got {bits!r}")
    return (1 << bits) - 1


def _check_group(group: GroupSpec) -> GroupSpec:
    if isinstance(group, str) and group in _NAMED_GROUPS:
        return group
    if isinstance(group, int) and not isinstance(group, bool) and group > 0:
        return group
    raise ValueError(f"group must be one of {_NAMED_GROUPS} or a positive int group size, got {group!r}")


def _resolve(ndim: int, group: GroupSpec) -> GroupSpec:
    """The group kind actually used for a tensor of rank ``ndim`` ("head" needs 4-D, "channel" needs >= 1-D)."""
    group = _check_group(group)
    if group == "head" and ndim != 4:
        group = "channel"
    if group == "channel" and ndim == 0:
        group = "tensor"
    return group


def group_reduce_dims(shape: torch.Size, group: GroupSpec) -> tuple[int, ...]:
    """Dims reduced (with keepdim) to get one statistic per group.

    For "head"/"channel"/"tensor" the dims index ``x`` itself, so the statistics broadcast against ``x`` without
    any permute or copy. For an int group size ``g`` they index the grouped view ``(ceil(numel / g), g)``.
    An empty tuple means every element is its own group (1-D tensor with channel groups).
    """
    ndim = len(shape)
    group = _resolve(ndim, group)
    if isinstance(group, int):
        return (1,)
    if group == "head":
        return (0, 2, 3)
    if group == "channel":
        return tuple(range(ndim - 1))
    return tuple(range(ndim))


class _Layout(NamedTuple):
    """A 2-D (rows, cols) working view of x whose row chunks are contiguous ranges of the flat codes."""

    group: GroupSpec  # resolved
    rows: int
    cols: int
    stats_shape: tuple[int, ...]  # public shape of lo/step


def _layout(shape: torch.Size, group: GroupSpec) -> _Layout:
    group = _resolve(len(shape), group)
    numel = shape.numel()
    if isinstance(group, int):
        n_groups = -(-numel // group)
        return _Layout(group, n_groups, group, (n_groups, 1))
    if group == "head":
        b, h, n, d = shape
        return _Layout(group, b * h, n * d, (1, h, 1, 1))
    if group == "channel":
        c = shape[-1]
        return _Layout(group, numel // c if c else 0, c, (1,) * (len(shape) - 1) + (c,))
    return _Layout(group, numel, 1, ())


def _fused_kernels(x: torch.Tensor):
    """The fused kernels that take x (non-empty): Triton's on CUDA, the compiled ones on the CPU; else None.
    Both modules have the same functions with the same arguments."""
    if x.numel() == 0:
        return None
    if _gpu.use_triton(x):
        from . import _triton

        return _triton
    return _native.kernels(KERNEL_SOURCE) if x.device.type == "cpu" else None


def makes_own_noise(device: torch.device) -> bool:
    """True when quantising on ``device`` runs a fused kernel, which draws its own rounding noise (a noise pool
    would go unused)."""
    return _fused_kernels(torch.empty(1, device=device)) is not None


def _kernel_layout(shape: torch.Size, lay: _Layout) -> tuple[int, int, bool, int]:
    """(rows, cols, per_col, period) for the fused kernels: statistic index = col or row % period."""
    if isinstance(lay.group, int):
        return lay.rows, lay.cols, False, lay.rows
    if lay.group == "head":
        return lay.rows, lay.cols, False, shape[1]
    if lay.group == "channel":
        return lay.rows, lay.cols, True, 1
    return 1, lay.rows, False, 1  # one group: a single row keeps whole blocks contiguous


def _working_view(x: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """x as (rows, cols); int groups pad the tail with the last element (which leaves its group's min/max as is)."""
    flat = x.reshape(-1)
    pad = lay.rows * lay.cols - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(lay.rows, lay.cols)


def _to_working(stat: torch.Tensor, lay: _Layout, shape: torch.Size) -> torch.Tensor:
    """A public-shaped statistic reshaped to broadcast against the (rows, cols) working view."""
    if lay.group == "head":
        b, h = shape[0], shape[1]
        return stat.view(1, h, 1).expand(b, h, 1).reshape(b * h, 1)
    if lay.group == "channel":
        return stat.view(1, lay.cols)
    if lay.group == "tensor":
        return stat.view(1, 1)
    return stat  # int groups: already (rows, 1)


def _row_slice(stat: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return stat[r0:r1] if stat.shape[0] > 1 else stat


def _rows_per_chunk(lay: _Layout, device: torch.device) -> int:
    if device.type != "cpu":
        return max(lay.rows, 1)
    # A multiple of 8 rows keeps every chunk's first code on a byte boundary for any bit width.
    return max(8, (_CHUNK // max(lay.cols, 1)) // 8 * 8)


def _minmax(x: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        zeros = torch.zeros(lay.stats_shape, dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    kernels = _fused_kernels(x)
    if kernels is not None:
        lo, hi = kernels.group_minmax(x.contiguous(), *_kernel_layout(x.shape, lay))
        return lo.view(lay.stats_shape), hi.view(lay.stats_shape)
    if isinstance(lay.group, int):
        xv = _working_view(x, lay)
        return xv.amin(dim=1, keepdim=True).float(), xv.amax(dim=1, keepdim=True).float()
    dims = group_reduce_dims(x.shape, lay.group)
    if not dims:  # 1-D channel groups: each element is its own group
        return x.to(torch.float32, copy=True), x.to(torch.float32, copy=True)
    # min/max are exact in the input dtype, so reduce there and cast the (small) result to fp32.
    lo = x.amin(dim=dims, keepdim=True).float().reshape(lay.stats_shape)
    hi = x.amax(dim=dims, keepdim=True).float().reshape(lay.stats_shape)
    return lo, hi


def group_minmax(x: torch.Tensor, group: GroupSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max in fp32, shaped to broadcast against x (against the grouped view for int sizes).

    "head": (B, H, N, D) or (B, H, N, M) -> (1, H, 1, 1); other ranks fall back to "channel".
    "channel": (1, ..., 1, C). "tensor": (). int g: (ceil(numel / g), 1) over consecutive chunks of g elements.
    NaN/inf propagate into the statistics of their group only (see ``ranges_are_finite``).
    """
    return _minmax(x.detach(), _layout(x.shape, group))


def ranges_are_finite(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """True when every group's range is finite, so quantising is meaningful. Synchronises on GPU.

    ``hi - lo`` is NaN/inf when either end is NaN/inf or when the range overflows fp32 (|values| near 3e38).
    """
    return bool(torch.isfinite(hi - lo).all())


@dataclass(frozen=True)
class QuantizedTensor:
    """Bit-packed codes plus what is needed to decode them; decode with ``dequantize``.

    ``clipped`` is a 0-d int64 tensor on the input's device (not a python int) so quantising never forces a
    GPU synchronisation; call ``int(q.clipped)`` when you log it. It is always 0 for batch (own min/max) ranges.
    For int group sizes ``packed`` also holds the padding codes of the last group (fewer than ``group``).
    """

    packed: torch.Tensor
    lo: torch.Tensor
    step: torch.Tensor
    bits: int
    group: GroupSpec
    shape: torch.Size
    dtype: torch.dtype
    clipped: torch.Tensor

    def nbytes(self) -> int:
        """Bytes actually held: packed codes plus the per-group lo and step."""
        return self.packed.nbytes + self.lo.nbytes + self.step.nbytes


def _snapshot(stat: torch.Tensor, shape: tuple[int, ...], device: torch.device, name: str) -> torch.Tensor:
    """A private fp32 copy of a running statistic (Mesa kept live references, which later updates corrupted)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    try:
        out.copy_(stat.detach())
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(stat.shape)} does not broadcast to the group statistics "
                         f"shape {shape}") from e
    return out


def quantize(
    x: torch.Tensor,
    bits: int,
    group: GroupSpec,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    noise_pool: torch.Tensor | None = None,
    count_clipped: bool = True,
) -> QuantizedTensor:
    """Affine-quantise x to ``bits``-bit codes per group: code = clamp(floor((x - lo) / step + u), 0, 2**bits - 1).

    Without lo/hi each group uses its own min/max (the "batch" range). With lo/hi (a running range, any shape
    that broadcasts to the group statistics) values outside it are clamped to the nearest end and counted in
    ``clipped``; they never wrap around. ``stochastic`` draws u uniformly from the 2**16 midpoints (k + 0.5) / 2**16
    of [0, 1) (16 random bits per value: 4 values per 64-bit draw, ~5x cheaper than ``torch.rand`` on CPU), so the
    decoded value is unbiased up to 2**-17 of a step; otherwise u = 0.5 (round to nearest).

    ``noise_pool`` (from ``make_noise_pool``) replaces the per-value draws by a slice of a pool of uniform
    values read at a random offset: each value still gets u uniform on [0, 1), so rounding stays unbiased,
    but neighbouring values' noise is correlated across calls. It costs one read instead of a random draw
    per value (about a third of the whole int8 overhead on CPU). ``count_clipped=False`` skips counting
    values outside a running range (two comparisons and a sum per value); ``clipped`` is then 0.
    The compiled CPU path needs neither: its noise is a hash of (seed from ``generator``, element index),
    uniform on the midpoints of 2**24 bins, and counting is part of its single pass.
    """
    levels = _check_bits(bits)
    group = _check_group(group)
    if (lo is None) != (hi is None):
        raise ValueError("lo and hi must be given together (a running range) or both left None (batch range)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    x = x.detach().contiguous()
    lay = _layout(x.shape, group)
    running = lo is not None
    if running:
        lo = _snapshot(lo, lay.stats_shape, x.device, "lo")
        hi = _snapshot(hi, lay.stats_shape, x.device, "hi")
    else:
        lo, hi = _minmax(x, lay)
    # step = range / levels, never below the smallest normal fp32: a zero range decodes exactly to lo and 1/step
    # stays finite for subnormal ranges. NaN ranges stay NaN.
    step = (hi - lo).clamp_(min=0).div_(levels).clamp_(min=_MIN_STEP)

    n_codes = lay.rows * lay.cols
    packed = torch.empty((n_codes * bits + 7) // 8, dtype=torch.uint8, device=x.device)
    clipped = torch.zeros((), dtype=torch.int64, device=x.device)
    kernels = _fused_kernels(x)
    if kernels is not None:
        # the seed stays on x's device: drawing it does not wait for the GPU
        seed = torch.randint(0, 2**31, (1,), generator=generator, device=x.device) if stochastic else clipped
        if x.device.type == "cpu":
            seed = int(seed)
        count = kernels.quantize_pack(x, *_kernel_layout(x.shape, lay), lo.reshape(-1), step.reciprocal().reshape(-1),
                                      bits, stochastic, seed, running and count_clipped, packed)
        clipped.fill_(count)
    elif n_codes:
        xw = _working_view(x, lay)
        lo_w = _to_working(lo, lay, x.shape)
        inv_w = _to_working(step.reciprocal(), lay, x.shape)
        # the 16-bit draws are centred on midpoints; pool noise is continuous
        offset = 0.5 + 2.0**-17 if stochastic and noise_pool is None else 0.5
        offset_t = torch.tensor(offset, dtype=torch.float32, device=x.device)
        rows_per = _rows_per_chunk(lay, x.device)
        for r0 in range(0, lay.rows, rows_per):
            r1 = min(r0 + rows_per, lay.rows)
            t = torch.sub(xw[r0:r1], _row_slice(lo_w, r0, r1))  # fp32 for half inputs (lo is fp32, not 0-d)
            torch.addcmul(offset_t, t, _row_slice(inv_w, r0, r1), out=t)  # (x - lo) / step + offset
            if running and count_clipped:
                outside = t < offset - _CLIP_SLACK
                outside |= t > levels + offset + _CLIP_SLACK
                clipped += outside.sum()
            if stochastic and noise_pool is not None:
                t.add_(_pool_slice(noise_pool, t.shape, generator))
            elif stochastic:
                m = t.numel()
                words = torch.empty((m + 3) // 4, dtype=torch.int64, device=x.device)
                words.random_(-(2**63), None, generator=generator)
                noise = words.view(torch.int16)[:m].view(t.shape).to(t.dtype)  # uniform in [-2**15, 2**15)
                t.add_(noise, alpha=2.0**-16)
            t.clamp_(0, levels)  # then float -> uint8 truncation is the floor
            e0, e1 = r0 * lay.cols, r1 * lay.cols
            dst = packed[e0 * bits // 8 : (e1 * bits + 7) // 8]
            if bits == 8:
                dst.view(t.shape).copy_(t)
            else:
                codes = t.to(torch.uint8).view(-1)
                codes.bitwise_and_(levels)  # a NaN's code is arbitrary: keep it out of its neighbours' bits
                _pack_into(codes, bits, dst)
    return QuantizedTensor(packed, lo, step, bits, group, x.shape, x.dtype, clipped)


def make_noise_pool(device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                    size: int = 4 * _CHUNK) -> torch.Tensor:
    """A pool of i.i.d. uniform values on [-0.5, 0.5) (fp32) for ``quantize(..., noise_pool=...)``."""
    return torch.rand(size, device=device, generator=generator).sub_(0.5)


def _pool_slice(pool: torch.Tensor, shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """``shape``-many pool values from a random offset (tiled if the pool is shorter)."""
    m = shape.numel()
    if m > pool.numel():
        pool = pool.repeat((m + pool.numel() - 1) // pool.numel() + 1)
    start = int(torch.randint(0, pool.numel() - m + 1, (), generator=generator, device=pool.device))
    return pool[start : start + m].view(shape)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Decode to a contiguous tensor of q.shape and q.dtype: lo + code * step per group (computed in fp32)."""
    lay = _layout(q.shape, q.group)
    device = q.packed.device
    kernels = _fused_kernels(q.packed)
    if kernels is not None and q.shape.numel():
        out = torch.empty(q.shape, dtype=q.dtype, device=device)
        kernels.unpack_dequantize(q.packed, *_kernel_layout(q.shape, lay), q.lo.reshape(-1), q.step.reshape(-1),
                                  q.bits, out)
        return out
    out = torch.empty((lay.rows, lay.cols), dtype=q.dtype, device=device)
    if lay.rows * lay.cols:
        lo_w = _to_working(q.lo, lay, q.shape)
        step_w = _to_working(q.step, lay, q.shape)
        rows_per = _rows_per_chunk(lay, device)
        for r0 in range(0, lay.rows, rows_per):
            r1 = min(r0 + rows_per, lay.rows)
            e0, e1 = r0 * lay.cols, r1 * lay.cols
            src = q.packed[e0 * q.bits // 8 : (e1 * q.bits + 7) // 8]
            codes = _unpack(src, q.bits, e1 - e0).view(r1 - r0, lay.cols).to(torch.float32)
            torch.addcmul(_row_slice(lo_w, r0, r1), codes, _row_slice(step_w, r0, r1), out=out[r0:r1])
    return out.view(-1)[: q.shape.numel()].view(q.shape)


def _pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack flat uint8 codes (< 2**bits) into ``out`` (ceil(n * bits / 8) bytes), first code in the low bits."""
    per = 8 // bits
    n = codes.numel()
    full = n - n % per
    if full:
        lanes = codes[:full].view(-1, per)
        dst = out[: full // per]
        dst.copy_(lanes[:, 0])
        for i in range(1, per):  # at most 7 vectorised passes, one per code position in a byte
            dst.bitwise_or_(lanes[:, i] << (bits * i))
    if full < n:
        shifts = torch.arange(0, bits * (n - full), bits, dtype=torch.uint8, device=codes.device)
        out[full // per] = (codes[full:] << shifts).sum(dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed.reshape(-1)[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).view(-1)[:numel]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits) into ceil(numel * bits / 8) bytes, first code in the low bits.

    For 8 bits the codes already are bytes and are returned flattened as they are (possibly sharing memory).
    """
    levels = _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    if flat.numel() and int(flat.max()) > levels:
        raise ValueError(f"codes must be < 2**bits = {levels + 1} for bits={bits}")
    out = torch.empty((flat.numel() * bits + 7) // 8, dtype=torch.uint8, device=codes.device)
    _pack_into(flat, bits, out)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes as a flat contiguous uint8 tensor."""
    _check_bits(bits)
    capacity = packed.numel() * 8 // bits
    if not 0 <= numel <= capacity:
        raise ValueError(f"numel must be in [0, {capacity}] for {packed.numel()} bytes at bits={bits}, got {numel}")
    return _unpack(packed, bits, numel)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor packed to 1 bit per value (ReLU-like ops only need the sign pattern to backpropagate)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
    if _gpu.use_triton(mask):
        from . import _triton

        return _triton.pack_mask(mask.contiguous())
    flat = mask.reshape(-1).view(torch.uint8)
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=mask.device)
    _pack_into(flat, 1, out)
    return out


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_mask``: a contiguous bool tensor of ``shape``."""
    numel = torch.Size(shape).numel()
    if numel > packed.numel() * 8:
        raise ValueError(f"shape {tuple(shape)} needs {numel} bits, packed holds {packed.numel() * 8}")
    if _gpu.use_triton(packed):
        from . import _triton

        return _triton.unpack_mask(packed, numel).view(shape)
    return _unpack(packed, 1, numel).view(torch.bool).view(shape)


def ema_update(
    running: tuple[torch.Tensor, torch.Tensor] | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesa's running range: the first batch sets it, then min and max move as decay * running + (1 - decay) * batch.

    (Mesa keeps EMAs of the min and of the range; since the EMA is linear that is the same as EMAs of min and max.)
    Returns new fp32 tensors; the inputs are not modified. A non-finite batch poisons the estimate: check first.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    b_lo, b_hi = (t.detach().to(torch.float32) for t in batch)
    if running is None:
        return b_lo.clone(), b_hi.clone()
    r_lo, r_hi = (t.detach().to(torch.float32) for t in running)
    if r_lo.shape != b_lo.shape or r_hi.shape != b_hi.shape:
        raise ValueError(f"running shapes {tuple(r_lo.shape)}/{tuple(r_hi.shape)} differ from batch shapes "
                         f"{tuple(b_lo.shape)}/{tuple(b_hi.shape)}")
    # lerp(batch, running, decay) = batch + decay * (running - batch), exact at decay 0 and 1.
    return torch.lerp(b_lo, r_lo, decay), torch.lerp(b_hi, r_hi, decay)

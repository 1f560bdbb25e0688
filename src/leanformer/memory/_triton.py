"""Fused Triton kernels for activation quantisation on the GPU: `quantize`'s fast path on CUDA tensors.

The same three passes as the compiled CPU kernels (csrc/quantize.cpp), with the same arguments, so `quantize.py`
calls either through one interface:

    group_minmax       x -> per-group min/max in fp32 (a NaN makes its group's statistics NaN)
    quantize_pack      x -> codes = clamp(floor((x - lo) * inv_step + u), 0, 2**bits - 1), bit-packed, clipping counted
    unpack_dequantize  codes -> lo + code * step, in the activation's dtype

plus ``pack_mask``/``unpack_mask`` for the 1-bit masks of ReLU-like ops. Each is one pass over memory, where
the PyTorch reference makes one pass per elementary op (subtract, scale, noise, clamp, cast, shift, or). The
layout is the CPU kernels': x is viewed as (rows, cols), contiguous; a group's statistic is indexed by the
column (``per_col``: channel groups) or by ``row % period`` (head groups, int-size groups, one tensor group).
Callers hand over permuted tensors (channels-last maps, transposed operands) in memory order, so nothing is copied.

Stochastic rounding draws u with Triton's counter-based Philox (``tl.rand``) from a seed held in a device tensor,
so quantising never waits for the GPU. Ideas from Mesa (Pan et al. 2021) and ActNN (Chen et al. 2021); see
`quantize.py` for the algorithm and its reference implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._gpu import on_input_device

_SLACK = 1e-3  # values within this fraction of a step outside the range are rounding noise, not clipping
_BYTES_PER_PROGRAM = 1024
_MINMAX_BLOCK = 1024  # elements per program (row groups: one piece of a long row, or several short rows)
_MINMAX_ROWS, _MINMAX_COLS, _MINMAX_TILES = 32, 64, 16  # channel groups: a program reduces 32 x 16 rows, 64 columns


@triton.jit
def _row_minmax_kernel(x_ptr, lo_ptr, hi_ptr, nan_ptr, numel, rows, cols, col_blocks, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Partial min/max/NaN count of BLOCK_R rows x one BLOCK_C piece of them: output index row * col_blocks + piece
    (short rows, as small int-size groups have, are taken many per program)."""
    pid = tl.program_id(0).to(tl.int64)
    piece = pid % col_blocks
    row = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = piece * BLOCK_C + tl.arange(0, BLOCK_C)
    offs = row[:, None] * cols + col[None, :]
    valid = (row < rows)[:, None] & (col < cols)[None, :] & (offs < numel)
    v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ok = valid & (v == v)
    out = row * col_blocks + piece
    row_ok = row < rows
    tl.store(lo_ptr + out, tl.min(tl.where(ok, v, float("inf")), axis=1), mask=row_ok)
    tl.store(hi_ptr + out, tl.max(tl.where(ok, v, -float("inf")), axis=1), mask=row_ok)
    tl.store(nan_ptr + out, tl.sum((valid & (v != v)).to(tl.int32), axis=1), mask=row_ok)


@triton.jit
def _col_minmax_kernel(x_ptr, lo_ptr, hi_ptr, nan_ptr, rows, cols, col_blocks, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    """Partial per-column min/max/NaN count over TILES * BLOCK_R rows: output row (pid // col_blocks)."""
    pid = tl.program_id(0)
    part = pid // col_blocks
    col = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = col < cols
    lo = tl.full((BLOCK_C,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_C,), -float("inf"), tl.float32)
    nans = tl.zeros((BLOCK_C,), tl.int32)
    for tile in range(TILES):
        row = (part.to(tl.int64) * TILES + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = (row < rows)[:, None] & col_ok[None, :]
        v = tl.load(x_ptr + row[:, None] * cols + col[None, :], mask=valid, other=0.0).to(tl.float32)
        ok = valid & (v == v)
        lo = tl.minimum(lo, tl.min(tl.where(ok, v, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, v, -float("inf")), axis=0))
        nans += tl.sum((valid & (v != v)).to(tl.int32), axis=0)
    out = part.to(tl.int64) * cols + col
    tl.store(lo_ptr + out, lo, mask=col_ok)
    tl.store(hi_ptr + out, hi, mask=col_ok)
    tl.store(nan_ptr + out, nans, mask=col_ok)


def _with_nan(lo: torch.Tensor, hi: torch.Tensor, nans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As torch.amin/amax: a group holding a NaN has NaN statistics (infinities are ordinary extremes)."""
    bad = nans > 0
    return lo.masked_fill_(bad, float("nan")), hi.masked_fill_(bad, float("nan"))


@on_input_device
def group_minmax(x: torch.Tensor, rows: int, cols: int, per_col: bool, period: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (lo, hi) of a contiguous x viewed as (rows, cols): ``cols`` statistics if per_col, else ``period``."""
    numel = x.numel()
    if per_col:
        col_blocks = triton.cdiv(cols, _MINMAX_COLS)
        parts = triton.cdiv(rows, _MINMAX_ROWS * _MINMAX_TILES)
        lo, hi = (torch.empty(parts, cols, dtype=torch.float32, device=x.device) for _ in range(2))
        nans = torch.empty(parts, cols, dtype=torch.int32, device=x.device)
        _col_minmax_kernel[(parts * col_blocks,)](x, lo, hi, nans, rows, cols, col_blocks, BLOCK_R=_MINMAX_ROWS,
                                                  BLOCK_C=_MINMAX_COLS, TILES=_MINMAX_TILES)
        return _with_nan(lo.amin(0), hi.amax(0), nans.sum(0))
    block_c = min(_MINMAX_BLOCK, triton.next_power_of_2(cols))
    block_r = _MINMAX_BLOCK // block_c
    col_blocks = triton.cdiv(cols, block_c)
    lo, hi = (torch.empty(rows * col_blocks, dtype=torch.float32, device=x.device) for _ in range(2))
    nans = torch.empty(rows * col_blocks, dtype=torch.int32, device=x.device)
    _row_minmax_kernel[(triton.cdiv(rows, block_r) * col_blocks,)](x, lo, hi, nans, numel, rows, cols, col_blocks,
                                                                   BLOCK_R=block_r, BLOCK_C=block_c)
    # pieces -> rows -> groups (row % period): rows is a multiple of period in every layout quantize.py makes
    shape = (rows // period, period, col_blocks)
    return _with_nan(lo.view(shape).amin((0, 2)), hi.view(shape).amax((0, 2)), nans.view(shape).sum((0, 2)))


@triton.jit
def _quantize_pack_kernel(x_ptr, lo_ptr, inv_ptr, seed_ptr, out_ptr, clipped_ptr, numel, n_codes, n_bytes, cols,
                          period, PER_COL: tl.constexpr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr,
                          COUNT: tl.constexpr, SLACK: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK output bytes, each holding 8 // BITS codes (first code in the low bits)."""
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, PER)
    e = byte[:, None] * PER + lane[None, :]  # flat code index, (BLOCK, PER)
    real = e < numel  # the padding codes of the last int-size group (numel <= e < n_codes) are 0, i.e. lo
    stat = e % cols if PER_COL else (e // cols) % period
    lo = tl.load(lo_ptr + stat, mask=e < n_codes, other=0.0)
    inv = tl.load(inv_ptr + stat, mask=e < n_codes, other=0.0)
    v = (tl.load(x_ptr + e, mask=real, other=0.0).to(tl.float32) - lo) * inv
    if COUNT:
        outside = real & ((v < -SLACK) | (v > LEVELS + SLACK))
        tl.store(clipped_ptr + tl.program_id(0), tl.sum(tl.sum(outside.to(tl.int32), axis=1), axis=0))
    if STOCHASTIC:
        v += tl.rand(tl.load(seed_ptr), e.to(tl.int32))
    else:
        v += 0.5
    v = tl.where(v > 0.0, v, 0.0)  # also maps NaN to 0
    v = tl.where(v < LEVELS, v, LEVELS)
    codes = tl.where(real, v.to(tl.int32), 0)
    packed = tl.sum(codes << (lane[None, :] * BITS), axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@on_input_device
def quantize_pack(x: torch.Tensor, rows: int, cols: int, per_col: bool, period: int, lo: torch.Tensor,
                  inv_step: torch.Tensor, bits: int, stochastic: bool, seed: torch.Tensor | int, count_clipped: bool,
                  out: torch.Tensor) -> torch.Tensor:
    """Quantise and pack x into ``out`` ((rows * cols * bits + 7) // 8 bytes); returns the clipped count (0-d int64,
    on x's device). ``seed`` may be a one-element int64 tensor on x's device: drawing it needs no synchronisation."""
    if isinstance(seed, int):
        seed = torch.tensor([seed], dtype=torch.int64, device=x.device)
    n_bytes = out.numel()
    grid = triton.cdiv(n_bytes, _BYTES_PER_PROGRAM)
    clipped = torch.zeros(grid if count_clipped else 1, dtype=torch.int32, device=x.device)
    _quantize_pack_kernel[(grid,)](x, lo, inv_step, seed, out, clipped, x.numel(), rows * cols, n_bytes, cols, period,
                                   PER_COL=per_col, BITS=bits, STOCHASTIC=stochastic, COUNT=count_clipped,
                                   SLACK=_SLACK, BLOCK=_BYTES_PER_PROGRAM)
    return clipped.sum(dtype=torch.int64)


@triton.jit
def _unpack_dequantize_kernel(packed_ptr, lo_ptr, step_ptr, out_ptr, numel, cols, period, PER_COL: tl.constexpr,
                              BITS: tl.constexpr, BLOCK: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < numel
    byte = tl.load(packed_ptr + e // PER, mask=valid, other=0).to(tl.int32)
    code = (byte >> ((e % PER).to(tl.int32) * BITS)) & LEVELS
    stat = e % cols if PER_COL else (e // cols) % period
    lo = tl.load(lo_ptr + stat, mask=valid, other=0.0)
    step = tl.load(step_ptr + stat, mask=valid, other=0.0)
    tl.store(out_ptr + e, (lo + code.to(tl.float32) * step).to(out_ptr.dtype.element_ty), mask=valid)


@on_input_device
def unpack_dequantize(packed: torch.Tensor, rows: int, cols: int, per_col: bool, period: int, lo: torch.Tensor,
                      step: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Decode the first ``out.numel()`` codes of ``packed`` into the contiguous ``out``."""
    block = 4 * _BYTES_PER_PROGRAM
    _unpack_dequantize_kernel[(triton.cdiv(out.numel(), block),)](packed, lo, step, out, out.numel(), cols, period,
                                                                  PER_COL=per_col, BITS=bits, BLOCK=block)


@triton.jit
def _pack_mask_kernel(mask_ptr, out_ptr, numel, n_bytes, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, 8)
    e = byte[:, None] * 8 + lane[None, :]
    bit = tl.load(mask_ptr + e, mask=e < numel, other=0).to(tl.int32) != 0
    packed = tl.sum(bit.to(tl.int32) << lane[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@on_input_device
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous bool tensor as ceil(numel / 8) bytes, first value in the low bit."""
    flat = mask.reshape(-1).view(torch.uint8)
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=mask.device)
    if out.numel():
        _pack_mask_kernel[(triton.cdiv(out.numel(), _BYTES_PER_PROGRAM),)](flat, out, flat.numel(), out.numel(),
                                                                          BLOCK=_BYTES_PER_PROGRAM)
    return out


@triton.jit
def _unpack_mask_kernel(packed_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < numel
    byte = tl.load(packed_ptr + e // 8, mask=valid, other=0).to(tl.int32)
    tl.store(out_ptr + e, ((byte >> (e % 8).to(tl.int32)) & 1).to(tl.uint8), mask=valid)


@on_input_device
def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` as a flat bool tensor."""
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel:
        block = 4 * _BYTES_PER_PROGRAM
        _unpack_mask_kernel[(triton.cdiv(numel, block),)](packed, out, numel, BLOCK=block)
    return out.view(torch.bool)

"""Triton kernels for activation-sparse FFNs at decoding batch sizes: `kernels.py`'s fast path on CUDA tensors.

At batch 1 a Linear is a matrix-vector product, bound by reading its weight; a unit that is zero needs none of its
weights. Two products cover the sparse FFN tails (TEAL, Liu et al. 2025; CATS, Lee et al. 2024; ProSparse, Song
et al. 2024; Deja Vu, Liu et al. 2023, whose predictors give the active units the same way):

    rows_product(x, w, scale, bias)  out[t, j] = scale[t, j] * (w[j] . x[t] + bias[j]), 0 where scale[t, j] == 0
    cols_product(h, w_t)             out[t] = sum over j with h[t, j] != 0 of h[t, j] * w_t[j]

The weight rows of zero units are masked out of the loads, so they are never read from memory, and activity is a
mask computed on the device: no index list, no host synchronisation per call (``torch.nonzero`` would wait for
the GPU). Each token is its own program column, so a unit zero for one token is skipped for that token. Sums are
fp32 whatever the weights' dtype (fp32, fp16, bf16); outputs take the activation's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._gpu import on_input_device

_BLOCK_ROWS, _BLOCK_IN = 32, 128  # rows_product: units per program, inputs per step
_BLOCK_UNITS, _BLOCK_OUT = 32, 128  # cols_product: units per step, outputs per program


@triton.jit
def _rows_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, units, features, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = n < units
    scale = tl.load(scale_ptr + t * units + n, mask=in_range, other=0.0).to(tl.float32)
    active = in_range & (scale != 0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < features
        xk = tl.load(x_ptr + t * features + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * features + k[None, :], mask=active[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * xk[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=active, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * units + n, (acc * scale).to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _cols_kernel(h_ptr, w_ptr, out_ptr, units, outputs, BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr):
    t = tl.program_id(1).to(tl.int64)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < outputs
    acc = tl.zeros((BLOCK_O,), tl.float32)
    for u0 in range(0, units, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        h = tl.load(h_ptr + t * units + u, mask=u < units, other=0.0).to(tl.float32)
        active = h != 0
        w = tl.load(w_ptr + u.to(tl.int64)[:, None] * outputs + o[None, :], mask=active[:, None] & o_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * h[:, None], axis=0)
    tl.store(out_ptr + t * outputs + o, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


@on_input_device
def rows_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """(tokens, units) = scale * (x @ weight.T + bias), reading only the rows of units whose scale is nonzero."""
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
    tokens, features = x.shape
    units = weight.shape[0]
    out = torch.empty(tokens, units, dtype=scale.dtype, device=x.device)
    if tokens and units:
        grid = (triton.cdiv(units, _BLOCK_ROWS), tokens)
        _rows_kernel[grid](x, weight, scale, bias if bias is not None else scale, out, units, features,
                           HAS_BIAS=bias is not None, BLOCK_N=_BLOCK_ROWS, BLOCK_K=_BLOCK_IN)
    return out


@on_input_device
def cols_product(h: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """(tokens, out) = h @ weight_t, reading only the rows of ``weight_t`` (units, out) whose h is nonzero."""
    h, weight_t = h.contiguous(), weight_t.contiguous()
    tokens, units = h.shape
    outputs = weight_t.shape[1]
    out = torch.empty(tokens, outputs, dtype=h.dtype, device=h.device)
    if tokens and outputs:
        grid = (triton.cdiv(outputs, _BLOCK_OUT), tokens)
        _cols_kernel[grid](h, weight_t, out, units, outputs, BLOCK_U=_BLOCK_UNITS, BLOCK_O=_BLOCK_OUT)
    return out

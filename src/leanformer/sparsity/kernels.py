"""Row-sparse products for FFN inference: compute only the hidden units that are active.

For a token whose FFN hidden vector x1 is mostly zero (a ReLU-family FFN, see `relufy`/`prosparse`),
the up/gate projections are needed only for the active rows of their weights, and the down projection
only for the active rows of its transposed weight. Two products cover both:

    gather_matmul(x, w, idx)    == x @ w[idx].T        (b, k): the selected output units
    scatter_matmul(h, wt, idx)  == h @ wt[idx]         (b, m): the down projection from k active units

and two whole FFN tails that also find the active units (those nonzero for at least one token of the call)
and refuse, returning None, when there are more than ``max_units`` of them (the caller then runs dense); they
also say which backend ran, so a caller can report it without asking again:

    gated_down(x, a, up_weight, up_bias, wt, max_units)   == (a * up(x)) @ wt     given a = act(gate(x))
    input_sparse_down(h, wt, max_units)                    == h @ wt

On CUDA tensors, at decoding batch sizes (up to `TRITON_MAX_TOKENS` tokens), the two tails run as Triton kernels
(``_triton.py``) that mask the zero units' weights out of their loads; they never synchronise with the host, so
they do not compare the count with ``max_units`` (their cost already scales with the active units) and report it
as a 0-d device tensor; ``max_units == 0`` (``max_active=0``: sparse never pays here) still refuses, as it costs
no synchronisation to know.
The compiled CPU kernels (csrc/sparse_ffn.cpp) read each selected row once, in place; the PyTorch path
(``index_select`` + matmul for the gather, ``embedding_bag`` with per-sample weights for the scatter) is the
reference and the fallback for other devices, dtypes, autograd, or ``LEANFORMER_NATIVE=0``; ``native=False``
asks for it where the compiled kernels turn out slower (`sparsify_for_inference` measures which is faster on the
machine). `backend` says which one a call takes, so callers can report what ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._gpu import use_triton
from .._native import kernels as _native_kernels

KERNEL_SOURCE = Path(__file__).parent / "csrc" / "sparse_ffn.cpp"  # the compiled fast path of this module
TRITON_MAX_TOKENS = 16  # the Triton kernels re-read weights per token: beyond decoding sizes, cuBLAS/torch wins

__all__ = ["SparseCall", "active_units", "backend", "gated_down", "gather_matmul", "input_sparse_down",
           "scatter_matmul"]


class SparseCall(NamedTuple):
    """What a whole sparse FFN tail returned: the output (None when refused), the units active (a 0-d device tensor
    from the Triton path, which does not synchronise to count), the backend."""

    out: torch.Tensor | None
    count: int | torch.Tensor
    backend: str


def backend(*tensors: torch.Tensor, native: bool = True) -> str:
    """"native" if the compiled kernels take these tensors (CPU fp32, no autograd, built) and ``native``, else
    "torch"."""
    if not native:
        return "torch"
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every FFN call of a decode step
        if not t.is_cpu or t.dtype != torch.float32 or (grad and t.requires_grad):
            return "torch"
    return "native" if _native_kernels(KERNEL_SOURCE) is not None else "torch"


def _check(a: torch.Tensor, w: torch.Tensor, index: torch.Tensor, what: str) -> None:
    if a.dim() != 2 or w.dim() != 2 or index.dim() != 1:
        raise ValueError(f"{what}: expected 2-D activations and weight and a 1-D index, got shapes "
                         f"{tuple(a.shape)}, {tuple(w.shape)}, {tuple(index.shape)}")
    if index.dtype != torch.long:
        raise ValueError(f"{what}: index must be int64, got {index.dtype}")


def _rows(weight: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index`` of ``weight`` in ``dtype``: only the selected rows are cast (fp32 weights under autocast)."""
    return weight.index_select(0, index).to(dtype)


def gather_matmul(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, native: bool = True) -> torch.Tensor:
    """``x @ weight[index].T``: rows ``index`` of a Linear's (out, in) weight applied to x (b, in) -> (b, k),
    computed in x's dtype (the selected rows are cast to it)."""
    _check(x, weight, index, "gather_matmul")
    if backend(x, weight, native=native) == "native":
        return _native_kernels(KERNEL_SOURCE).gather_matmul(x.contiguous(), weight.contiguous(), index.contiguous())
    return x @ _rows(weight, index, x.dtype).T


def scatter_matmul(h: torch.Tensor, weight_t: torch.Tensor, index: torch.Tensor, native: bool = True
                   ) -> torch.Tensor:
    """``h @ weight_t[index]``: the down projection from the k active units h (b, k) -> (b, m).

    ``weight_t`` is the down Linear's weight transposed to (hidden, out), neuron-major, so a unit's
    weights are one contiguous row. Computed in h's dtype: a weight of another dtype (fp32 under bf16/fp16
    autocast) has its selected rows cast, as ``embedding_bag`` takes one dtype only.
    """
    _check(h, weight_t, index, "scatter_matmul")
    if h.shape[1] != index.numel():
        raise ValueError(f"scatter_matmul: h has {h.shape[1]} columns for {index.numel()} indices")
    if backend(h, weight_t, native=native) == "native":
        return _native_kernels(KERNEL_SOURCE).scatter_matmul(h.contiguous(), weight_t.contiguous(),
                                                            index.contiguous())
    if index.numel() == 0:
        return h.new_zeros(h.shape[0], weight_t.shape[1])
    if weight_t.dtype != h.dtype:
        return h @ _rows(weight_t, index, h.dtype)
    bags = index.expand(h.shape[0], -1)  # every token sums the same rows, weighted by its own h
    return F.embedding_bag(bags, weight_t, per_sample_weights=h, mode="sum")


def active_units(a: torch.Tensor) -> torch.Tensor:
    """Indices of the columns of ``a`` (tokens, units) nonzero for at least one token, increasing."""
    return (a != 0).any(0).nonzero().squeeze(1)


def _triton_tail(*tensors: torch.Tensor) -> bool:
    """Whether a sparse FFN tail takes the Triton kernels: CUDA tensors, no autograd, decoding batch sizes."""
    if tensors[0].shape[0] > TRITON_MAX_TOKENS or not use_triton(*tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _active_count(a: torch.Tensor) -> torch.Tensor:
    return (a != 0).any(0).sum()


def gated_down(x: torch.Tensor, a: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor | None,
               weight_t: torch.Tensor, max_units: int, threshold: float | None = None, native: bool = True
               ) -> SparseCall:
    """``(a * (x @ up_weight.T + up_bias)) @ weight_t`` over the active units of ``a``; ``out`` is None if
    more than ``max_units`` are active.

    With ``threshold``, ``a`` is the gate's output before a FATReLU/ReLU at that threshold, which is applied
    here (fused: one pass over ``a`` fewer, one tensor fewer at batch 1).
    """
    if _triton_tail(x, a, up_weight, weight_t):
        from . import _triton

        if threshold is not None:
            a = a.masked_fill(a < threshold, 0)
        if max_units <= 0:
            return SparseCall(None, _active_count(a), "triton")
        h = _triton.rows_product(x, up_weight, a, up_bias)
        return SparseCall(_triton.cols_product(h, weight_t), _active_count(a), "triton")
    if backend(x, a, up_weight, weight_t, native=native) == "native" and (
            up_bias is None or up_bias.dtype == torch.float32):
        out, count = _native_kernels(KERNEL_SOURCE).gated_down(
            x.contiguous(), a.contiguous(), up_weight.contiguous(),
            None if up_bias is None else up_bias.contiguous(), weight_t.contiguous(), max_units, threshold)
        return SparseCall(out, count, "native")
    if threshold is not None:
        a = a.masked_fill(a < threshold, 0)
    index = active_units(a)
    if index.numel() > max_units:
        return SparseCall(None, index.numel(), "torch")
    up = gather_matmul(x, up_weight, index, native=native)
    if up_bias is not None:
        up = up + up_bias[index].to(up.dtype)
    return SparseCall(scatter_matmul(a.index_select(1, index) * up, weight_t, index, native=native), index.numel(),
                      "torch")


def input_sparse_down(h: torch.Tensor, weight_t: torch.Tensor, max_units: int, native: bool = True) -> SparseCall:
    """``h @ weight_t`` over the units nonzero for some token of ``h`` (tokens, units); ``out`` is None if
    more than ``max_units`` are."""
    if _triton_tail(h, weight_t):
        from . import _triton

        if max_units <= 0:
            return SparseCall(None, _active_count(h), "triton")
        return SparseCall(_triton.cols_product(h, weight_t), _active_count(h), "triton")
    if backend(h, weight_t, native=native) == "native":
        out, count = _native_kernels(KERNEL_SOURCE).input_sparse_down(h.contiguous(), weight_t.contiguous(), max_units)
        return SparseCall(out, count, "native")
    index = active_units(h)
    if index.numel() > max_units:
        return SparseCall(None, index.numel(), "torch")
    return SparseCall(scatter_matmul(h.index_select(1, index), weight_t, index, native=native), index.numel(),
                      "torch")

"""Triton kernels for SMoRA's gather path on the GPU: `layer.gather_adapter`'s fast path on CUDA tensors.

Per token t, with its k active ranks r_j and gates g_j (SMoRA, Zhao et al. 2025), the adapter adds

    delta[t] = sum_j g_j * h[t, r_j] * B[:, r_j]          h = A x for all ranks

One kernel computes it (reading only the k active columns of B per token), one the gradients of h (at the active
ranks) and of the gates. B's gradient, sum over tokens of grad[t] x (g_j * h[t, r_j]) at column r_j, is one dense
product of grad with the per-token weights scattered into (tokens, r): a tensor-core GEMM beats tokens x k x out
atomic adds. h = A x itself stays one dense product, computed together with the router's logits: on a GPU a single
GEMM that reads x once costs less than re-reading k rows of A for every token. Sums are fp32; outputs take B's
dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._gpu import on_input_device

_BLOCK_OUT = 128


@triton.jit
def _forward_kernel(h_ptr, bt_ptr, ranks_ptr, gates_ptr, out_ptr, r, k, outputs, BLOCK_O: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < outputs
    acc = tl.zeros((BLOCK_O,), tl.float32)
    for j in range(k):
        rank = tl.load(ranks_ptr + t * k + j)
        weight = tl.load(h_ptr + t * r + rank).to(tl.float32) * tl.load(gates_ptr + t * k + j).to(tl.float32)
        acc += weight * tl.load(bt_ptr + rank * outputs + o, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * outputs + o, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _backward_kernel(grad_ptr, h_ptr, bt_ptr, ranks_ptr, gates_ptr, grad_h_ptr, grad_gates_ptr, r, k, outputs,
                     BLOCK_O: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for j in range(k):
        rank = tl.load(ranks_ptr + t * k + j)
        hv = tl.load(h_ptr + t * r + rank).to(tl.float32)
        gate = tl.load(gates_ptr + t * k + j).to(tl.float32)
        dot = tl.zeros((BLOCK_O,), tl.float32)
        for o0 in range(0, outputs, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_ok = o < outputs
            g = tl.load(grad_ptr + t * outputs + o, mask=o_ok, other=0.0).to(tl.float32)
            dot += g * tl.load(bt_ptr + rank * outputs + o, mask=o_ok, other=0.0).to(tl.float32)
        gw = tl.sum(dot, axis=0)
        tl.atomic_add(grad_h_ptr + t * r + rank, gw * gate)  # a rank used twice by one token adds up
        tl.store(grad_gates_ptr + t * k + j, gw * hv)


class _GatherAdapter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        h, ranks, gates = h.contiguous(), ranks.contiguous(), gates.contiguous()
        bt = b.t().contiguous()  # (r, out): an active rank's column of B is one contiguous row
        tokens, r = h.shape
        k, outputs = ranks.shape[1], bt.shape[1]
        out = torch.empty(tokens, outputs, dtype=b.dtype, device=h.device)
        if tokens and outputs:
            _forward_kernel[(tokens, triton.cdiv(outputs, _BLOCK_OUT))](h, bt, ranks, gates, out, r, k, outputs,
                                                                        BLOCK_O=_BLOCK_OUT)
        ctx.save_for_backward(h, bt, ranks, gates)
        return out

    @staticmethod
    @once_differentiable  # the kernels are not themselves differentiable: a double backward must fail, not be wrong
    def backward(ctx, grad: torch.Tensor):
        h, bt, ranks, gates = ctx.saved_tensors
        tokens, r = h.shape
        k, outputs = ranks.shape[1], bt.shape[1]
        grad = grad.contiguous()
        grad_h = torch.zeros(tokens, r, dtype=torch.float32, device=h.device)
        grad_gates = torch.empty(tokens, k, dtype=torch.float32, device=h.device)
        if tokens and k:
            _backward_kernel[(tokens,)](grad, h, bt, ranks, gates, grad_h, grad_gates, r, k, outputs,
                                        BLOCK_O=_BLOCK_OUT)
        grad_b = None
        if ctx.needs_input_grad[1]:
            weights = h.gather(1, ranks).float() * gates.float()
            dense = torch.zeros(tokens, r, dtype=torch.float32, device=h.device).scatter_add_(1, ranks, weights)
            grad_b = (grad.t().float() @ dense).to(bt.dtype)  # (out, r), B's own shape
        return (grad_h.to(h.dtype) if ctx.needs_input_grad[0] else None, grad_b, None,
                grad_gates.to(gates.dtype) if ctx.needs_input_grad[3] else None)


@on_input_device
def gather_adapter(h: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``sum_j gates[t, j] * h[t, ranks[t, j]] * b[:, ranks[t, j]]`` per token t: (tokens, out) in b's dtype."""
    return _GatherAdapter.apply(h, b, ranks, gates)

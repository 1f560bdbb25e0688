"""A drop-in `nn.Linear` whose fp32 CPU matmuls run through oneDNN when that is available.

PyTorch sends fp32 CPU `F.linear` to its BLAS (MKL in the official wheels). oneDNN's matmul, which
PyTorch also ships, is about 2x faster for the forward product and the input gradient on the
shapes of vision Transformers on the AMD EPYC machines this project is measured on (see
`benchmarks/backbones.py`). The weight gradient stays on BLAS, which is as fast or faster there.

`Linear` keeps `nn.Linear`'s parameters and state-dict keys and is an `nn.Linear`, so every tool
that finds or wraps Linear layers still does. The plain `F.linear` path is the reference: it is
used whenever the fast one does not apply (GPU, other dtypes, autocast, tracing/compiling/export)
or when `fast_path` is switched off, and the tests hold the two equal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_linear_available()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b on 2-D x; forward and input gradient through oneDNN, weight gradient through BLAS."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _fast_path_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


class Linear(nn.Linear):
    """`nn.Linear` with an automatic oneDNN fast path on fp32 CPU tensors (same numbers within fp32)."""

    fast_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast_path and _fast_path_applies(x, self.weight)):
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        out = _OneDNNLinearFunction.apply(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)


def set_fast_linear(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the oneDNN path of every leanformer `Linear` in `model` on or off (for comparisons)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.fast_path = enabled
    return model

"""A drop-in `nn.Linear` whose fp32 CPU matmuls run through oneDNN when that is available.

PyTorch sends fp32 CPU `F.linear` to its BLAS (MKL in the official wheels). oneDNN's matmul, which
PyTorch also ships, is about 2x faster for the forward product and the input gradient on the
shapes of vision Transformers on an AMD EPYC Zen 4, and slower on a Zen 3 (see
`benchmarks/backbones.py`). So the choice is measured, per weight shape, on the machine that runs it:
forward and backward of 256-2,048 rows through each path, interleaved, oneDNN kept only when it is faster
by more than 3%; cached per machine (`leanformer._tuning`, `leanformer tune` redoes it). The weight
gradient stays on BLAS.

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


_MARGIN = 0.03  # oneDNN must beat BLAS by this fraction to be chosen
_TUNING_WORK = 1 << 29  # multiply-adds per timed product: about 2,048 rows of a ViT-S Linear, fewer for big ones


def onednn_is_faster(in_features: int, out_features: int) -> bool:
    """Whether oneDNN's forward + input gradient beats BLAS for this weight shape here (measured once, cached)."""
    from .._timing import time_interleaved
    from .._tuning import tuned

    def measure() -> dict:
        with torch.inference_mode(False), torch.enable_grad():  # the first call may come under no_grad
            return _measure()

    def _measure() -> dict:
        rows = max(256, min(2048, _TUNING_WORK // (in_features * out_features)))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(rows, in_features, generator=generator, requires_grad=True)
        weight = torch.randn(out_features, in_features, generator=generator, requires_grad=True)
        bias = torch.randn(out_features, generator=generator, requires_grad=True)
        grad = torch.randn(rows, out_features, generator=generator)
        paths = {"blas": lambda: F.linear(x, weight, bias).backward(grad),
                 "onednn": lambda: _OneDNNLinearFunction.apply(x, weight, bias).backward(grad)}
        seconds = {k: v["median_s"] for k, v in time_interleaved(paths, runs=5).items()}
        return {"choice": "onednn" if seconds["onednn"] < seconds["blas"] * (1 - _MARGIN) else "blas",
                "seconds": seconds}

    return tuned("linear_onednn", f"{in_features}x{out_features}", measure)["choice"] == "onednn"


class Linear(nn.Linear):
    """`nn.Linear` with a oneDNN fast path on fp32 CPU tensors where it is faster (same numbers within fp32).

    ``fast_path``: "auto" (default: oneDNN where measured faster on this machine for this shape), True (always,
    where it applies) or False (never).
    """

    fast_path: bool | str = "auto"
    _onednn_measured: bool | None = None

    def _use_onednn(self) -> bool:
        if self.fast_path != "auto":
            return bool(self.fast_path)
        if self._onednn_measured is None:
            self._onednn_measured = onednn_is_faster(self.in_features, self.out_features)
        return self._onednn_measured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_fast_path_applies(x, self.weight) and self._use_onednn()):
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        out = _OneDNNLinearFunction.apply(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)


def set_fast_linear(model: nn.Module, enabled: bool | str) -> nn.Module:
    """Set the oneDNN path of every leanformer `Linear` in `model`: True, False or "auto" (for comparisons)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.fast_path = enabled
    return model

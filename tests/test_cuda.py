"""On a CUDA GPU (skipped without one): activation compression under AMP with the caching allocator, its per-module
accounting, the Triton quantisation kernels against the reference on device, sparsity measurement.

The sparse-inference and SMoRA kernels have their CUDA tests beside their CPU ones (tests/sparsity, tests/adapters);
`leanformer train --device cuda` is tested in tests/cli/test_cli.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.memory.test_compress import grads_of, relative_error

from leanformer import create_model
from leanformer.memory import CompressionConfig, compress_activations, saved_activation_bytes
from leanformer.memory.quantize import dequantize, group_minmax, quantize
from leanformer.sparsity import measure_sparsity, relufy

pytestmark = pytest.mark.cuda


def _swin(device: str = "cuda") -> torch.nn.Module:
    return create_model("swin_tiny_patch4_window7_224", img_size=64, drop_path_rate=0.0, num_classes=10).to(device)


def _peak_training_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Peak CUDA memory of one AMP training step above what the model and its gradients hold."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compression_under_amp_shrinks_the_cuda_peak(dtype):
    """The saved bytes, not process RSS, are what the caching allocator's peak is made of: int8 must cut it."""
    torch.manual_seed(0)
    model = _swin().train()
    x = torch.randn(32, 3, 64, 64, device="cuda")
    exact_peak = _peak_training_bytes(model, x, dtype)
    exact_grads = grads_of(model, x)
    compressed = compress_activations(copy.deepcopy(model), CompressionConfig(bits=8))
    int8_peak = _peak_training_bytes(compressed, x, dtype)
    assert int8_peak < 0.7 * exact_peak
    assert relative_error(grads_of(compressed, x), exact_grads) < 0.05


def test_saved_bytes_are_reported_per_module_on_cuda():
    model = compress_activations(_swin(), CompressionConfig(bits=4))
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with saved_activation_bytes(model) as report, torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).sum()
    assert 0 < report.ratio < 0.3
    blocks = [name for name in report.per_module if name.startswith("layers.")]
    assert blocks and all(report.per_module[n]["stored"] < report.per_module[n]["original"] for n in blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", ["head", "channel", "tensor", 1000])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_triton_quantize_matches_the_reference_on_cuda(bits, group, dtype, monkeypatch):
    x = (torch.randn(4, 6, 197, 64, device="cuda") * 3 + 1).to(dtype)
    lo, hi = group_minmax(x, group)
    q = quantize(x, bits, group, stochastic=False)
    out = dequantize(q)
    monkeypatch.setenv("LEANFORMER_TRITON", "0")
    ref_lo, ref_hi = group_minmax(x, group)
    ref_q = quantize(x, bits, group, stochastic=False)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    real = x.numel() * bits // 8
    # the same codes up to a last-bit tie between fused and unfused fp32 arithmetic
    assert (q.packed[:real] != ref_q.packed[:real]).float().mean() < 1e-4
    torch.testing.assert_close(out.float(), dequantize(ref_q).float(), rtol=1e-2, atol=float(q.step.max()) * 1.01)


def test_sparsity_is_measured_alike_on_cuda_and_cpu():
    torch.manual_seed(0)
    model = relufy(create_model("swin_tiny_patch4_window7_224", img_size=64, num_classes=10)).eval()
    x = torch.randn(4, 3, 64, 64)
    on_cpu = measure_sparsity(model, [x])
    on_gpu = measure_sparsity(model.cuda(), [x.cuda()])
    assert on_gpu.average_sparsity == pytest.approx(on_cpu.average_sparsity, abs=1e-3)

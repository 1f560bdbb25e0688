"""The Triton sparse-FFN kernels (the GPU path), run on CPU tensors by Triton's interpreter, against the PyTorch
reference: the products alone, the FFN tails, and whole models through `sparsify_for_inference`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_activations import FAMILIES, tiny_llama

from leanformer.sparsity import ReLUConfig, find_ffns, relufy
from leanformer.sparsity.inference import SparseInferenceConfig, inference_report, sparsify_for_inference
from leanformer.sparsity.kernels import gated_down, input_sparse_down

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _sparse(shape: tuple[int, int], active: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    return values * (torch.rand(shape, generator=generator) < active)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("active", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tokens", [1, 3])
def test_the_ffn_tails_equal_the_reference(tokens, active, dtype, triton_on_cpu):
    """Sizes that are not multiples of the blocks; every token with its own zeros; bias and fused threshold."""
    g = torch.Generator().manual_seed(tokens)
    features, units, outputs = 150, 70, 131
    x = torch.randn(tokens, features, generator=g).to(dtype)
    a = _sparse((tokens, units), active, g).to(dtype)
    up = torch.randn(units, features, generator=g).to(dtype)
    bias = torch.randn(units, generator=g).to(dtype)
    down_t = torch.randn(units, outputs, generator=g).to(dtype)
    atol, rtol = TOLERANCE[dtype]
    want = (a.float() * (x.float() @ up.float().T + bias.float())) @ down_t.float()
    call = gated_down(x, a, up, bias, down_t, max_units=units)
    assert call.backend == "triton" and call.out.dtype == dtype
    torch.testing.assert_close(call.out.float(), want, atol=atol * features, rtol=rtol)
    assert int(call.count) == int((a != 0).any(0).sum())
    threshold = 0.3  # FATReLU fused: gate outputs below it are zero
    fat = a.masked_fill(a < threshold, 0)
    want = (fat.float() * (x.float() @ up.float().T)) @ down_t.float()
    call = gated_down(x, a, up, None, down_t, max_units=units, threshold=threshold)
    torch.testing.assert_close(call.out.float(), want, atol=atol * features, rtol=rtol)
    call = input_sparse_down(a, down_t, max_units=units)
    assert call.backend == "triton"
    torch.testing.assert_close(call.out.float(), a.float() @ down_t.float(), atol=atol * units, rtol=rtol)


def test_beyond_decoding_sizes_the_reference_runs(triton_on_cpu):
    a = torch.randn(40, 8).relu()
    assert input_sparse_down(a, torch.randn(8, 5), max_units=8).backend != "triton"


@pytest.mark.parametrize("family", ["hf_llama", "hf_bert"])
def test_one_token_through_the_triton_path_equals_the_dense_model(family, triton_on_cpu):
    """A gated (LLaMA) and a plain (BERT) FFN at decoding size: one token per call."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[family][0]()
    relufy(model).eval()
    single = {k: v[:1, :1] for k, v in inputs.items()}
    with torch.no_grad():
        dense = model(**single)
        sparse_model = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=1.0))
        got = sparse_model(**single)
    pick = lambda out: out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(pick(got), pick(dense), atol=2e-5, rtol=1e-4)
    report = inference_report(sparse_model)
    assert len(report) == len(find_ffns(model)) and all(r["calls"] == {"sparse-triton": 1} for r in report.values())


def test_generate_on_the_triton_path_gives_the_same_tokens(triton_on_cpu):
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model, ReLUConfig("fatrelu", 0.05)).eval()
    prompt = torch.randint(0, 50, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(prompt, **kwargs)
        sparse_model = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=1.0))
        assert torch.equal(sparse_model.generate(prompt, **kwargs), dense)
    report = inference_report(sparse_model)
    assert all(r["calls"].get("sparse-triton", 0) >= 5 for r in report.values())  # every one-token step
    assert all(0 < r["computed_fraction"] < 1 for r in report.values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_ffn_tails_on_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, generator=g).to("cuda", dtype)
    gate, up = (torch.randn(1536, 576, generator=g).div(24).to("cuda", dtype) for _ in range(2))
    down_t = torch.randn(1536, 576, generator=g).div(40).to("cuda", dtype)
    a = F.relu(x @ gate.T)
    call = gated_down(x, a, up, None, down_t, max_units=1536)
    assert call.backend == "triton"
    want = (a.float() * (x.float() @ up.float().T)) @ down_t.float()
    torch.testing.assert_close(call.out.float(), want, atol=3e-2, rtol=3e-2)
    call = input_sparse_down(a, down_t, max_units=1536)
    torch.testing.assert_close(call.out.float(), a.float() @ down_t.float(), atol=3e-2, rtol=3e-2)


def test_max_active_zero_still_means_dense_on_the_triton_path(triton_on_cpu):
    """``max_units == 0`` (max_active=0: sparse never pays) refuses without a sync; any other limit is not compared."""
    g = torch.Generator().manual_seed(5)
    x, a = torch.randn(1, 12, generator=g), torch.randn(1, 9, generator=g).relu()
    up, down_t = torch.randn(9, 12, generator=g), torch.randn(9, 7, generator=g)
    with torch.no_grad():
        for call in (gated_down(x, a, up, None, down_t, max_units=0, threshold=0.0),
                     input_sparse_down(a, down_t, max_units=0)):
            assert call.out is None and call.backend == "triton" and int(call.count) == int((a != 0).sum())
        assert input_sparse_down(a, down_t, max_units=1).out is not None  # not compared: no sync for it
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model, ReLUConfig("fatrelu", 0.05)).eval()
    ids = torch.randint(0, 50, (1, 1))
    with torch.no_grad():
        dense = model(ids).logits
        always_dense = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=0.0))
        torch.testing.assert_close(always_dense(ids).logits, dense, atol=2e-5, rtol=1e-4)
    assert all(r["calls"] == {"dense": 1} for r in inference_report(always_dense).values())

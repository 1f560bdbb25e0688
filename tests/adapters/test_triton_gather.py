"""SMoRA's fused gather kernels (the GPU path), run on CPU tensors by Triton's interpreter, against the PyTorch
reference (`embedding_bag`) and the dense product: forward, every gradient, and training steps."""

from __future__ import annotations

import copy

import pytest
import torch

from leanformer.adapters import SMoRAConfig
from leanformer.adapters.layer import SMoRALinear, dense_adapter, gather_adapter


def _inputs(tokens: int, r: int, k: int, out: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, r, generator=g).to(dtype).requires_grad_()
    b = torch.randn(out, r, generator=g).to(dtype).requires_grad_()
    ranks = torch.stack([torch.randperm(r, generator=g)[:k] for _ in range(tokens)])
    gates = torch.rand(tokens, k, generator=g).to(dtype).requires_grad_()
    return h, b, ranks, gates


def _reference(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv("LEANFORMER_TRITON", "0")
        return fn()


@pytest.mark.parametrize(("tokens", "r", "k", "out"), [(1, 16, 1, 37), (37, 16, 16, 130), (5, 64, 8, 200)])
def test_forward_and_gradients_equal_the_reference(tokens, r, k, out, triton_on_cpu, monkeypatch):
    h, b, ranks, gates = _inputs(tokens, r, k, out, torch.float32)
    grad = torch.randn(tokens, out)

    def run():
        y = gather_adapter(h, b, ranks, gates)
        return (y, *torch.autograd.grad(y, (h, b, gates), grad))

    got = run()
    want = _reference(monkeypatch, run)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], dense_adapter(h, b, ranks, gates), atol=1e-5, rtol=1e-5)


def test_bf16_forward_and_gradients_are_close(triton_on_cpu, monkeypatch):
    h, b, ranks, gates = _inputs(9, 32, 4, 70, torch.bfloat16)
    grad = torch.randn(9, 70).to(torch.bfloat16)

    def run():
        y = gather_adapter(h, b, ranks, gates)
        return (y, *torch.autograd.grad(y, (h, b, gates), grad))

    for a, w in zip(run(), _reference(monkeypatch, run), strict=True):
        assert a.dtype == w.dtype
        torch.testing.assert_close(a.float(), w.float(), atol=0.1, rtol=0.03)


def test_a_rank_used_twice_by_a_token_adds_up(triton_on_cpu, monkeypatch):
    h, b, _, gates = _inputs(3, 8, 2, 11, torch.float32)
    ranks = torch.tensor([[1, 1], [0, 5], [7, 7]])
    grad = torch.randn(3, 11)

    def run():
        y = gather_adapter(h, b, ranks, gates)
        return (y, *torch.autograd.grad(y, (h, b, gates), grad))

    for a, w in zip(run(), _reference(monkeypatch, run), strict=True):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


def test_training_steps_on_the_triton_path_follow_the_reference(triton_on_cpu, monkeypatch):
    torch.manual_seed(0)
    layer = SMoRALinear(torch.nn.Linear(24, 40), SMoRAConfig(r=16, active_r=4, compute="gather"), compute="gather")
    torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero: make the first step exercise every gradient
    x = torch.randn(2, 13, 24)

    def train(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model

    got = train(copy.deepcopy(layer))
    want = _reference(monkeypatch, lambda: train(copy.deepcopy(layer)))
    for (name, a), (_, w) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernels_on_cuda(dtype, monkeypatch):
    h, b, ranks, gates = (t.detach().cuda().requires_grad_(t.is_floating_point()) for t in
                          _inputs(300, 64, 8, 2048, dtype))
    grad = torch.randn(300, 2048, device="cuda").to(dtype)

    def run():
        y = gather_adapter(h, b, ranks, gates)
        return (y, *torch.autograd.grad(y, (h, b, gates), grad))

    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.5, "rtol": 0.05}
    for a, w in zip(run(), _reference(monkeypatch, run), strict=True):
        torch.testing.assert_close(a.float(), w.float(), **tol)


@pytest.mark.cuda
def test_smora_trains_saves_and_reloads_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    from leanformer.adapters import add_smora, load_adapter, save_adapter

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).cuda()
    model = add_smora(copy.deepcopy(base), SMoRAConfig(r=16, active_r=4, compute="gather"))
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base).cuda(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

import pytest
import torch
import torch.nn.functional as F

from leanformer.models._linear import _ONEDNN, Linear, set_fast_linear


def forward_backward(fn, x, layer, upstream):
    x = x.detach().requires_grad_(True)
    layer.zero_grad()
    out = fn(x)
    out.backward(upstream)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return out.detach(), grads, out.grad_fn


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_reference(shape, bias):
    layer = Linear(16, 24, bias=bias)
    x = torch.randn(shape)
    upstream = torch.randn(*shape[:-1], 24)
    out, grads, grad_fn = forward_backward(layer, x, layer, upstream)
    ref, ref_grads, _ = forward_backward(lambda t: F.linear(t, layer.weight, layer.bias), x, layer, upstream)
    assert torch.allclose(out, ref, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-4)
    if _ONEDNN:
        assert "OneDNN" in type(grad_fn).__name__ or "View" in type(grad_fn).__name__


def test_non_contiguous_input():
    layer = Linear(16, 8)
    x = torch.randn(16, 6).t()
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_switch_off_and_fallbacks_use_plain_linear():
    model = torch.nn.Sequential(Linear(4, 4))
    set_fast_linear(model, False)
    assert type(model(torch.randn(2, 4, requires_grad=True)).grad_fn).__name__ == "AddmmBackward0"
    layer = Linear(4, 4).double()
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(3, 5)
    assert isinstance(layer, torch.nn.Linear)
    plain = torch.nn.Linear(3, 5)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3)
    assert torch.allclose(plain(x), layer(x), atol=1e-6)

import json

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
    layer.fast_path = True  # the oneDNN path whatever this machine measures
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


def test_auto_measures_each_shape_once_and_follows_the_measurement(tmp_path, monkeypatch):

    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path))
    layer = Linear(16, 24)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x)
    cached = json.loads(next((tmp_path / "tuning").glob("*.json")).read_text())["choices"]["linear_onednn"]["16x24"]
    assert cached["choice"] in ("onednn", "blas") and set(cached["seconds"]) == {"onednn", "blas"}
    # the cached choice decides, and a new layer of the shape does not measure again
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("leanformer._timing.time_interleaved", no_measuring)
    path = next((tmp_path / "tuning").glob("*.json"))
    for choice, nodes in (("blas", ("AddmmBackward0",)), ("onednn", ("OneDNN", "View"))):
        payload = json.loads(path.read_text())
        payload["choices"]["linear_onednn"]["16x24"]["choice"] = choice
        path.write_text(json.dumps(payload))
        name = type(Linear(16, 24)(x).grad_fn).__name__
        if _ONEDNN or choice == "blas":
            assert any(node in name for node in nodes), (choice, name)

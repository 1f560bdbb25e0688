"""FATReLU, TopK, relufy and apply_topk on our, timm and Hugging Face models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from leanformer import create_model
from leanformer.sparsity.activations import FATReLU, ReLUConfig, TopK, TopKConfig, apply_topk, relufy
from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.measure import measure_sparsity


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50)
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 50, (2, 7))}


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50)
    return transformers.BertModel(config), {"input_ids": torch.randint(0, 50, (2, 7))}


def timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    return model, torch.randn(2, 3, 32, 32)


def timm_swin():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2),
                              num_heads=(2, 4), window_size=4, num_classes=10)
    return model, torch.randn(2, 3, 32, 32)


def our_swin():
    model = create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                         window_size=4, num_classes=10)
    return model, torch.randn(2, 3, 32, 32)


def our_msmlp():
    model = create_model("msmlp_tiny", img_size=32, embed_dim=20, depths=(1, 1), mix_size=[[1, 1, 3, 5, 7],
                                                                                          [1, 3, 3, 5, 7]],
                         num_classes=10)
    return model, torch.randn(2, 3, 32, 32)


FAMILIES = {"hf_llama": (tiny_llama, 2), "hf_bert": (tiny_bert, 2), "timm_vit": (timm_vit, 12),
            "timm_swin": (timm_swin, 4), "our_swin": (our_swin, 4), "our_msmlp": (our_msmlp, 2)}


# --- FATReLU -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold, kept", [
    (0.01, [False, False, False, False, True, True, True]),
    (0.0, [False, False, True, True, True, True, True]),
])
def test_fatrelu_values_and_gradient_match_the_definition(threshold, kept):
    values = [-1.0, -0.01, 0.0, 0.005, 0.01, 0.02, 1.5]
    x = torch.tensor(values, requires_grad=True)
    out = FATReLU(threshold)(x)
    expected = torch.tensor([v if k else 0.0 for v, k in zip(values, kept, strict=True)])
    assert torch.equal(out, expected)
    out.backward(torch.full_like(x, 3.0))
    assert torch.equal(x.grad, torch.tensor([3.0 if k else 0.0 for k in kept]))


def test_fatrelu_zero_threshold_is_relu_in_value():
    x = torch.randn(4, 9, 33)
    assert torch.equal(FATReLU()(x), torch.relu(x))


@pytest.mark.parametrize("threshold", [-0.01, math.nan, math.inf, "0.1", True])
def test_fatrelu_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        FATReLU(threshold)


def test_fatrelu_repr():
    assert "threshold=0.01" in repr(FATReLU(0.01))


# --- TopK ----------------------------------------------------------------------------------------------------------


def test_topk_keeps_exactly_the_k_largest_per_token_and_routes_gradient_only_to_them():
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = TopK(4)(x)
    kept = out != 0
    assert torch.equal(kept.sum(-1), torch.full((3, 5), 4))
    threshold = x.detach().topk(4, dim=-1).values[..., -1:]  # the 4th largest value of each token
    assert torch.equal(kept, x.detach() >= threshold)
    assert torch.equal(out[kept], x.detach()[kept])
    grad = torch.randn_like(x)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad, torch.zeros_like(grad)))


def test_topk_with_k_at_least_the_width_is_identity():
    x = torch.randn(2, 6)
    assert TopK(6)(x) is x
    assert TopK(100)(x) is x


@pytest.mark.parametrize("k", [0, -3, 2.5, True, None])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        TopK(k)


def test_topk_repr():
    assert "k=7" in repr(TopK(7))


# --- relufy --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_relufy_puts_relu_in_every_ffn_and_makes_it_sparse(family):
    build, n_ffns = FAMILIES[family]
    model, batch = build()
    before = [type(ffn.act) for ffn in find_ffns(model)]
    assert nn.ReLU not in before
    assert relufy(model) is model
    ffns = find_ffns(model)
    assert len(ffns) == n_ffns
    assert all(type(ffn.act) is nn.ReLU for ffn in ffns)
    assert len({id(ffn.act) for ffn in ffns}) == n_ffns  # one module per FFN, not a shared one
    report = measure_sparsity(model, [batch])
    assert len(report.layers) == n_ffns
    assert all(0 < layer.mean_sparsity < 1 for layer in report.layers)


def test_relufy_gated_ffn_replaces_the_gate_activation():
    model, batch = tiny_llama()
    relufy(model)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.act_fn, nn.ReLU)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = mlp.down_proj(torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), expected)


def test_relufy_fatrelu_sets_threshold_and_is_at_least_as_sparse_as_relu():
    model, x = our_swin()
    relu = measure_sparsity(relufy(model), [x])
    relufy(model, ReLUConfig("fatrelu", 0.05))
    acts = [ffn.act for ffn in find_ffns(model)]
    assert all(isinstance(act, FATReLU) and act.threshold == 0.05 for act in acts)
    fat = measure_sparsity(model, [x])
    for a, b in zip(fat.layers, relu.layers, strict=True):
        assert a.mean_sparsity >= b.mean_sparsity
    assert fat.average_sparsity > relu.average_sparsity


def test_bad_configs_are_refused_naming_the_field_before_any_model_is_touched():
    with pytest.raises(ValueError, match=r"activation='gelu': expected one of relu, fatrelu"):
        ReLUConfig("gelu")
    with pytest.raises(ValueError, match="threshold=0.01 applies only to activation='fatrelu'"):
        ReLUConfig("relu", 0.01)
    with pytest.raises(ValueError, match=r"threshold=-0.1: expected a finite number >= 0"):
        ReLUConfig("fatrelu", -0.1)
    with pytest.raises(ValueError, match="threshold=nan"):
        ReLUConfig("fatrelu", math.nan)
    with pytest.raises(ValueError, match="k=0"):
        TopKConfig(0)
    with pytest.raises(ValueError, match="specs: expected FFNSpec entries"):
        ReLUConfig(specs=["mlp"])
    model, _ = our_swin()
    before = [type(ffn.act) for ffn in find_ffns(model)]
    with pytest.raises(ValueError, match="expected a ReLUConfig, got 'fatrelu'"):
        relufy(model, "fatrelu")  # the loose-argument form of earlier versions
    with pytest.raises(ValueError, match="expected a TopKConfig, got 8"):
        apply_topk(model, 8)
    assert [type(ffn.act) for ffn in find_ffns(model)] == before


def test_relufy_unsupported_model_names_its_class():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no FFN found in Tiny"):
        relufy(Tiny())
    with pytest.raises(ValueError, match="no FFN found in Tiny"):
        apply_topk(Tiny(), TopKConfig(2))


# --- apply_topk ----------------------------------------------------------------------------------------------------


def test_apply_topk_wraps_the_activation_and_leaves_k_nonzeros_per_token():
    model, x = our_swin()
    acts = [ffn.act for ffn in find_ffns(model)]
    assert apply_topk(model, TopKConfig(8)) is model
    for ffn, act in zip(find_ffns(model), acts, strict=True):
        assert isinstance(ffn.act, nn.Sequential) and ffn.act[0] is act and ffn.act[1].k == 8
    for layer in measure_sparsity(model, [x]).layers:  # GELU outputs are never exactly 0 here: exactly k survive
        assert layer.p10 == layer.p90 == pytest.approx(1 - 8 / layer.hidden)
    apply_topk(model, TopKConfig(4))  # replaces k, does not stack a second TopK
    for ffn, act in zip(find_ffns(model), acts, strict=True):
        assert len(ffn.act) == 2 and ffn.act[0] is act and ffn.act[1].k == 4


def test_relufy_after_apply_topk_keeps_the_topk():
    model, _ = our_swin()
    relufy(apply_topk(model, TopKConfig(3)), ReLUConfig("fatrelu", 0.01))
    for ffn in find_ffns(model):
        assert isinstance(ffn.act[0], FATReLU) and ffn.act[1].k == 3


def test_apply_topk_on_gated_ffn_bounds_nonzeros_of_x1():
    model, batch = tiny_llama()
    apply_topk(model, TopKConfig(5))
    for layer in measure_sparsity(model, [batch]).layers:
        assert layer.p10 >= 1 - 5 / layer.hidden - 1e-12


def test_apply_topk_rejects_bad_k():
    model, _ = our_swin()
    with pytest.raises(ValueError, match="k=0: expected an integer >= 1"):
        apply_topk(model, TopKConfig(0))
    assert not any(isinstance(ffn.act, nn.Sequential) for ffn in find_ffns(model))


def test_target_modules_selects_ffns_by_name_as_every_config_does():
    """One selection language for every transform: names or name endings, or one regex on the full name."""
    from leanformer.sparsity import SparseInferenceConfig, inference_report, sparsify_for_inference

    torch.manual_seed(0)
    model, inputs = tiny_llama()
    relufy(model, ReLUConfig(target_modules=("layers.0.mlp",)))
    kinds = {ffn.name: type(ffn.act).__name__ for ffn in find_ffns(model)}
    assert kinds == {"model.layers.0.mlp": "ReLU", "model.layers.1.mlp": "SiLUActivation"}
    relufy(model, ReLUConfig("fatrelu", 0.01, target_modules=r"model\.layers\.1\.mlp"))
    apply_topk(model, TopKConfig(8, target_modules=("layers.1.mlp",)))
    kinds = {ffn.name: type(ffn.act).__name__ for ffn in find_ffns(model)}
    assert kinds == {"model.layers.0.mlp": "ReLU", "model.layers.1.mlp": "Sequential"}
    sparsify_for_inference(model.eval(), SparseInferenceConfig(max_active=1.0, target_modules=("layers.0.mlp",)))
    assert list(inference_report(model)) == ["model.layers.0.mlp"]
    with pytest.raises(ValueError, match=r"target_modules=\('attn',\) selects none of the FFNs of LlamaForCausalLM"):
        relufy(model, ReLUConfig(target_modules=("attn",)))

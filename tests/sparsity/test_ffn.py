"""FFN discovery: every listed family is found with the right Linears; unknown models get a usable error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_activations import FAMILIES

from leanformer.sparsity.ffn import FFNSpec, find_ffns


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_ffn_of_each_family_is_found(family):
    build, count = FAMILIES[family]
    model, _ = build()
    ffns = find_ffns(model)
    assert len(ffns) == count
    for ffn in ffns:
        assert ffn.up.out_features == ffn.down.in_features == ffn.hidden_features
        assert ffn.gated == (family == "hf_llama")
        if ffn.gated:
            assert ffn.gate.out_features == ffn.hidden_features and ffn.gate is not ffn.up
        assert isinstance(ffn.act, nn.Module)
    assert len({id(f.down) for f in ffns}) == count  # distinct layers, in model order
    names = [name for name, _ in model.named_modules()]
    assert [names.index(f.name) for f in ffns] == sorted(names.index(f.name) for f in ffns)


@pytest.mark.parametrize("config_name", ["MistralConfig", "Qwen2Config"])
def test_other_gated_hugging_face_ffns(config_name):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ffns = find_ffns(model)
    assert len(ffns) == 2 and all(f.gated for f in ffns)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in, self.nonlin, self.w_out = nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.w_out(self.nonlin(self.w_in(x)))


def test_explicit_specs_and_set_act():
    model = nn.Sequential(_Block(), _Block())
    no_activation = nn.Sequential(_Block())
    no_activation[0].nonlin = nn.Identity()  # the structural fallback would find _Block with its GELU
    with pytest.raises(ValueError, match=r"no FFN found in Sequential.*FFNSpec"):
        find_ffns(no_activation)
    ffns = find_ffns(model, [FFNSpec(("_Block",), up="w_in", down="w_out", act="nonlin")])
    assert [f.name for f in ffns] == ["0", "1"]
    ffns[0].set_act(nn.ReLU())
    assert isinstance(model[0].nonlin, nn.ReLU) and isinstance(model[1].nonlin, nn.GELU)
    assert model(torch.randn(3, 4)).shape == (3, 4)


def test_a_spec_that_does_not_fit_names_the_attribute():
    with pytest.raises(ValueError, match=r"'w_up'.*up"):
        find_ffns(nn.Sequential(_Block()), [FFNSpec(("_Block",), up="w_up", down="w_out", act="nonlin")])
    with pytest.raises(ValueError, match=r"nonlin \(down\) is a GELU, expected nn.Linear"):
        find_ffns(nn.Sequential(_Block()), [FFNSpec(("_Block",), up="w_in", down="nonlin", act="nonlin")])

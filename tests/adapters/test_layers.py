"""SMoRA on the layer types users bring besides nn.Linear (GPT-2's Conv1D, 1x1 Conv2d FFNs), on PEFT models, and
the errors for what it cannot wrap."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.adapters import SMoRAConfig, SMoRALinear, add_smora, load_adapter, save_adapter, smora_layers
from leanformer.adapters.model import target_names

transformers = pytest.importorskip("transformers")


def _randomize(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in smora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def _tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_adapted_and_round_trip(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 6))
    base = model(ids).logits
    add_smora(model, SMoRAConfig(r=8, active_r=2, compute="dense"))
    names = sorted(smora_layers(model))
    assert names == sorted(f"transformer.h.{i}.{p}" for i in range(2)
                           for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    torch.testing.assert_close(model(ids).logits, base)  # B = 0: the base model
    _randomize(model)
    layer = smora_layers(model)["transformer.h.0.mlp.c_fc"]
    x = torch.randn(3, 32)
    reference_linear = nn.Linear(32, 128)
    with torch.no_grad():  # Conv1D stores W as (in, out): the same layer as a Linear with W transposed
        reference_linear.weight.copy_(layer.base_layer.weight.t())
        reference_linear.bias.copy_(layer.base_layer.bias)
    reference = SMoRALinear(reference_linear, layer.config)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")},
                              strict=False)
    torch.testing.assert_close(layer(x), reference(x))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.lora_B.weight.grad is not None and layer.base_layer.weight.grad is None
    model.eval()
    save_adapter(model, tmp_path)
    fresh = load_adapter(_tiny_gpt2(), tmp_path)
    torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits)


class ConvFFN(nn.Module):
    """A ConvNeXt-style block: 3x3 depthwise conv, then a 1x1-conv FFN over the channels."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw1, self.pw2 = nn.Conv2d(channels, 4 * channels, 1), nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x):
        return x + self.pw2(F.gelu(self.pw1(self.dw(x))))


def test_a_1x1_conv2d_is_a_linear_over_the_channels():
    torch.manual_seed(0)
    model = ConvFFN()
    x = torch.randn(2, 8, 5, 5)
    base = model(x)
    add_smora(model, SMoRAConfig(r=4, active_r=2, target_modules=("pw1", "pw2"), compute="gather"))
    torch.testing.assert_close(model(x), base)
    _randomize(model)
    layer = model.pw1
    as_linear = nn.Linear(8, 32)
    with torch.no_grad():
        as_linear.weight.copy_(layer.base_layer.weight.flatten(1))
        as_linear.bias.copy_(layer.base_layer.bias)
    reference = SMoRALinear(as_linear, layer.config)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")},
                              strict=False)
    h = model.dw(x)
    torch.testing.assert_close(layer(h), reference(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_a_layer_smora_cannot_wrap_is_named_with_its_type():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"\['dw'\]: Conv2d with kernel \(3, 3\).* is not supported by SMoRA"):
        add_smora(ConvFFN(), SMoRAConfig(r=4, active_r=2, target_modules=("dw", "pw1")))
    with pytest.raises(ValueError, match="Embedding is not supported by SMoRA"):
        add_smora(_tiny_gpt2(), SMoRAConfig(r=4, active_r=2, target_modules=("wte",)))


def test_an_invalid_regex_names_the_field():
    with pytest.raises(ValueError, match=r"target_modules='\(q\|k': not a valid regular expression"):
        SMoRAConfig(target_modules="(q|k")


def test_a_peft_model_keeps_its_lora_layers_to_itself():
    peft = pytest.importorskip("peft")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60)
    torch.manual_seed(0)
    lora = peft.get_peft_model(transformers.BertModel(config), peft.LoraConfig(r=4, target_modules=["query"]))
    lora.eval()
    ids = torch.randint(0, 60, (2, 5))
    before = lora(input_ids=ids).last_hidden_state
    names = target_names(lora, SMoRAConfig(r=4, active_r=2))
    assert names and not any("lora_" in n or "query" in n for n in names)  # PEFT's layers: neither wrapped nor under
    add_smora(lora, SMoRAConfig(r=4, active_r=2))
    torch.testing.assert_close(lora(input_ids=ids).last_hidden_state, before)
    peft_parts = [m for n, m in lora.named_modules() if n.endswith(("query", "lora_A.default", "lora_B.default",
                                                                    "query.base_layer"))]
    assert len(peft_parts) == 8 and not any(isinstance(m, SMoRALinear) for m in peft_parts)
    assert any(n.endswith("attention.self.key") for n in smora_layers(lora))  # the rest is adapted


def test_saved_adapters_say_what_they_are_and_how_to_load_them(tmp_path):
    model = add_smora(copy.deepcopy(_tiny_gpt2()), SMoRAConfig(r=4, active_r=2, compute="dense"))
    save_adapter(model, tmp_path, base_model_name_or_path="gpt2-tiny")
    readme = (tmp_path / "README.md").read_text()
    assert "leanformer.load_adapter" in readme and "gpt2-tiny" in readme and "KeyError: 'SMORA'" in readme

"""A transformed model saved and reloaded is the same model: `save_pretrained` / `load_pretrained` round-trip ReLU,
FATReLU and Top-k exactly, and a plain reload either gives the same model (ReLU, when transformers can express it)
or fails loudly, never silently the original activation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from leanformer import ReLUConfig, TopKConfig, apply_topk, create_model, load_pretrained, relufy, save_pretrained
from leanformer.sparsity import FATReLU, TopK, find_ffns

transformers = pytest.importorskip("transformers")


def _llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _bert(cls):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60)
    torch.manual_seed(0)
    return cls(config).eval()


IDS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _out(model):
    with torch.no_grad():
        result = model(IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _plain_reload(model, folder):
    return type(model).from_pretrained(str(folder)).eval()


def _activation_types(model):
    return [(type(f.act).__name__, f.act.extra_repr()) for f in find_ffns(model)]


def test_relu_llama_reloads_plainly_with_the_same_logits(tmp_path):
    model = relufy(_llama())
    model.save_pretrained(tmp_path)  # the model's own save: the config already tells the truth
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "relu"
    reloaded = _plain_reload(model, tmp_path)
    assert torch.equal(_out(reloaded), _out(model))
    assert all(isinstance(f.act, nn.ReLU) for f in find_ffns(reloaded))


@pytest.mark.parametrize("transform", ["fatrelu", "topk", "relu+topk", "fatrelu+topk"])
def test_what_transformers_cannot_express_refuses_a_plain_reload_and_round_trips_exactly(transform, tmp_path):
    model = _llama()
    if "relu" in transform:
        relufy(model, ReLUConfig("fatrelu", 0.02) if "fatrelu" in transform else ReLUConfig())
    if "topk" in transform:
        apply_topk(model, TopKConfig(9))
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyError, match="leanformer.load_pretrained"):
        _plain_reload(model, tmp_path / "plain")
    save_pretrained(model, tmp_path / "ours")
    for folder in ("plain", "ours"):
        reloaded = load_pretrained(tmp_path / folder).eval()
        assert _activation_types(reloaded) == _activation_types(model)
        assert torch.equal(_out(reloaded), _out(model))
        assert reloaded.config.hidden_act == model.config.hidden_act  # a copy saved again still refuses


def test_relu_where_the_same_field_drives_another_layer_refuses_a_plain_reload(tmp_path):
    model = relufy(_bert(transformers.BertForMaskedLM))  # hidden_act also drives the MLM head's transform (GELU)
    save_pretrained(model, tmp_path)
    with pytest.raises(KeyError, match="leanformer.load_pretrained"):
        _plain_reload(model, tmp_path)
    reloaded = load_pretrained(tmp_path).eval()
    assert torch.equal(_out(reloaded), _out(model))
    assert type(reloaded.cls.predictions.transform.transform_act_fn) is not nn.ReLU


def test_relu_bert_encoder_reloads_plainly(tmp_path):
    model = relufy(_bert(transformers.BertModel))
    save_pretrained(model, tmp_path)
    assert torch.equal(_out(_plain_reload(model, tmp_path)), _out(model))


def test_fatrelu_zero_is_saved_as_relu(tmp_path):
    model = relufy(_llama(), ReLUConfig("fatrelu", 0.0))
    save_pretrained(model, tmp_path)
    assert torch.equal(_out(_plain_reload(model, tmp_path)), _out(model))


def _swin():
    torch.manual_seed(0)
    return create_model("swin_nano_patch2_window4_32", num_classes=3).eval()


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
                             depth=2).eval()


@pytest.mark.parametrize("build", [_swin, _timm_vit], ids=["swin", "timm_vit"])
def test_other_modules_round_trip_and_refuse_a_plain_checkpoint_load(build, tmp_path):
    model = apply_topk(relufy(build(), ReLUConfig("fatrelu", 0.03)), TopKConfig(20))
    x = torch.randn(2, 3, 32, 32)
    save_pretrained(model, tmp_path)
    reloaded = load_pretrained(tmp_path, build())
    assert _activation_types(reloaded) == _activation_types(model)
    assert all(isinstance(f.act[0], FATReLU) and isinstance(f.act[1], TopK) for f in find_ffns(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    if build is _swin:
        with pytest.raises(ValueError, match="load_pretrained"):
            create_model("swin_nano_patch2_window4_32", num_classes=3, checkpoint_path=tmp_path / "model.safetensors")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda r: r["activations"].__setitem__("model.layers.0.mlp.act_fn", {"act": "fatrelu", "threshold": "x"}),
     r"activations\['model.layers.0.mlp.act_fn'\].threshold='x'"),
    (lambda r: r.__setitem__("activations", [1, 2]), "'activations' must be an object"),
    (lambda r: r["activations"].__setitem__("model.nowhere.act", {"act": "relu"}), "no module 'model.nowhere.act'"),
    (lambda r: r.__setitem__("version", 99), "version 99 is not supported"),
])
def test_a_damaged_record_is_refused_naming_the_field(edit, match, tmp_path):
    save_pretrained(relufy(_llama(), ReLUConfig("fatrelu", 0.02)), tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    edit(values["leanformer"])
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)

"""SMoRA adapters on disk in PEFT's layout: round trip, the official code's files, and bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_smora import TwoLayers, _randomize_b, tiny_bert

from leanformer.adapters import SMoRAConfig, add_smora, load_adapter, save_adapter, smora_layers
from leanformer.adapters.peft import CONFIG_NAME, WEIGHTS_NAME


def _trained_bert(**config):
    model = tiny_bert()
    add_smora(model, SMoRAConfig(**{"r": 8, "active_r": 2, "modules_to_save": ("classifier",), **config}))
    _randomize_b(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        for layer in smora_layers(model).values():
            layer.lora_biases.copy_(torch.linspace(-0.1, 0.1, layer.lora_biases.numel()))
    return model


def test_round_trip_into_a_fresh_base_model(tmp_path):
    model = _trained_bert(target_modules=("query", "value"), bias_update_rate=1e-5)
    ids = torch.randint(0, 60, (2, 7))
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-bert")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SMORA" and config["base_model_name_or_path"] == "tiny-bert"
    assert (config["r"], config["active_r"], config["target_modules"], config["modules_to_save"]) == (
        8, 2, ["query", "value"], ["classifier"])
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query."
    assert {prefix + k for k in ("lora_A.weight", "lora_B.weight", "lora_router.weight", "lora_biases")} <= keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any("base_layer" in k for k in keys)  # the frozen base is not part of the adapter

    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)
    layer = fresh.bert.encoder.layer[0].attention.self.query
    assert layer.config.bias_update_rate == 1e-5
    assert torch.equal(layer.lora_biases, model.bert.encoder.layer[0].attention.self.query.lora_biases)


def test_loading_into_a_model_that_has_the_adapter_already(tmp_path):
    torch.manual_seed(0)
    model = add_smora(TwoLayers(), SMoRAConfig(r=4, active_r=2))
    _randomize_b(model, seed=3)
    save_adapter(model, tmp_path)
    other = add_smora(TwoLayers(), SMoRAConfig(r=4, active_r=2))
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
    load_adapter(other, tmp_path)
    x = torch.randn(3, 12)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_the_official_codes_adapter_files_load(tmp_path):
    """StyxXuan/smora writes peft_type SRMOLE, `activate_r`, and no balancing fields."""
    torch.manual_seed(0)
    source = add_smora(TwoLayers(), SMoRAConfig(r=4, active_r=2, target_modules=("fc1", "fc2")))
    _randomize_b(source)
    save_adapter(source, tmp_path)
    official = {"peft_type": "SRMOLE", "r": 4, "activate_r": 2, "lora_alpha": 16, "lora_dropout": 0.0,
                "target_modules": ["fc2", "fc1"], "rank_partition": 1, "epsilon_greedy": False, "use_dora": False}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(official))
    fresh = TwoLayers()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in source.state_dict().items()
                           if "lora" not in k}, strict=False)
    load_adapter(fresh, tmp_path)
    cfg = fresh.fc1.config
    assert (cfg.active_r, cfg.bias_update_rate, cfg.gate_scores) == (2, 1e-5, "biased")


def _saved(tmp_path):
    torch.manual_seed(0)
    save_adapter(add_smora(TwoLayers(), SMoRAConfig(r=4, active_r=2)), tmp_path)
    return load_file(tmp_path / WEIGHTS_NAME)


def test_bad_adapter_files_raise_naming_the_file_and_change_nothing(tmp_path):
    tensors = _saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    model = TwoLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    broken = dict(tensors)
    broken.pop("base_model.model.fc1.lora_router.weight")
    save_file(broken, weights)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: does not fit this model: missing "
                                         r"\['base_model.model.fc1.lora_router.weight'\]"):
        load_adapter(model, tmp_path)

    broken = dict(tensors)
    broken["base_model.model.fc1.lora_A.weight"] = torch.zeros(4, 5)
    save_file(broken, weights)
    with pytest.raises(ValueError, match=r"'base_model.model.fc1.lora_A.weight' has shape \(4, 5\), this model "
                                         r"needs \(4, 12\)"):
        load_adapter(model, tmp_path)

    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(model, tmp_path)

    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_adapter(model, tmp_path)

    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type='LORA' is not a SMoRA adapter"):
        load_adapter(model, tmp_path)

    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "SMORA", "r": 4, "active_r": 6}))
    with pytest.raises(ValueError, match="adapter_config.json: active_r=6: expected at most r=4"):
        load_adapter(model, tmp_path)

    with pytest.raises(ValueError, match="does not exist: not an adapter directory"):
        load_adapter(model, tmp_path / "missing")
    assert not smora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

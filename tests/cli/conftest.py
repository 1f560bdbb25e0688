"""Tiny Hugging Face causal LM folders and a small text file, built once per session for the CLI tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from leanformer.cli.main import main

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[[Path, str], Path]:
    """Write a 2-layer LLaMA (hidden 32, FFN 64, byte vocabulary) with FFN activation ``hidden_act`` to a folder."""
    transformers = pytest.importorskip("transformers")
    from leanformer._hf import hf_progress_bars

    def build(folder: Path, hidden_act: str) -> Path:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                          hidden_act=hidden_act)
        with hf_progress_bars(False):
            transformers.LlamaForCausalLM(config).save_pretrained(folder)
        return folder

    return build


@pytest.fixture(scope="session")
def relu_dir(tiny_llama, tmp_path_factory) -> Path:
    """A ReLU LLaMA folder as `leanformer sparsify` saves one with threshold 0 (no sparsity.json needed)."""
    return tiny_llama(tmp_path_factory.mktemp("relu") / "model", "relu")


@pytest.fixture(scope="session")
def silu_dir(tiny_llama, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("silu") / "model", "silu")


@pytest.fixture(scope="session")
def fatrelu_dir(relu_dir, tmp_path_factory) -> Path:
    """The ReLU folder with the sparsity.json `leanformer sparsify --threshold 0.05` writes (its config part)."""
    folder = tmp_path_factory.mktemp("fatrelu") / "model"
    shutil.copytree(relu_dir, folder)
    (folder / "sparsity.json").write_text(json.dumps({"config": {"threshold": 0.05, "steps": 10}}))
    return folder


@pytest.fixture(scope="session")
def lm_text(tmp_path_factory) -> Path:
    """The first 4 KiB of Tiny Shakespeare."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared tinyshakespeare not found at {SHAKESPEARE}")
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_bytes(SHAKESPEARE.read_bytes()[:4096])
    return path


@pytest.fixture(scope="session")
def predictors_dir(relu_dir, lm_text, tmp_path_factory) -> Path:
    """A copy of the ReLU folder holding the predictors `leanformer predictors` wrote there (its default --out)."""
    folder = tmp_path_factory.mktemp("with-predictors") / "model"
    shutil.copytree(relu_dir, folder)
    assert main(["predictors", "--model", str(folder), "--data", str(lm_text), "--steps", "20", "--batches", "3",
                 "--seq-len", "32", "--batch-size", "4", "--no-progress", "--json"]) == 0
    return folder

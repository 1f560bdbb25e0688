"""`leanformer sparsify` and `leanformer finetune` under torchrun: 2 processes train as 1 does (the engine gives
each its slice of every global batch), and only the first writes the outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import run_leanformer

pytest.importorskip("transformers")

SPARSIFY = ["--steps", "8", "--relu-steps", "2", "--stages", "[[3, 0.05], [6, 0.5]]", "--lr", "3e-3",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "4", "--no-progress", "--json"]
FINETUNE = ["--rank", "8", "--active-r", "2", "--steps", "12", "--batch-size", "8", "--lr", "3e-3", "--eval-every",
            "6", "--compute", "gather", "--no-progress", "--json"]


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


def assert_same_history(expected: list[dict], got: list[dict], keys: tuple[str, ...]) -> None:
    assert [entry["step"] for entry in got] == [entry["step"] for entry in expected]
    for want, have in zip(expected, got, strict=True):
        for key in keys:
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_two_process_sparsify_matches_one_process(tiny_llama, lm_text, tmp_path):
    model = tiny_llama(tmp_path / "llama", "silu")
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        run_leanformer("sparsify", "--model", str(model), "--data", str(lm_text), *SPARSIFY, "--out", str(out),
                       processes=processes)
        runs[processes] = out
    one, two = (json.loads((runs[n] / "sparsity.json").read_text()) for n in (1, 2))
    assert_same_history(one["history"], two["history"], ("train_loss", "val_loss", "sparsity", "lambda"))
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)
    assert_same_weights(load_file(runs[1] / "model.safetensors"), load_file(runs[2] / "model.safetensors"))
    assert not (runs[2] / ".lock").exists()


def without_dropout(folder: Path, into: Path) -> Path:
    """A copy of a Hugging Face folder whose config turns dropout off: each process would draw its own masks."""
    shutil.copytree(folder, into)
    config = json.loads((into / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (into / "config.json").write_text(json.dumps(config))
    return into


def test_two_process_finetune_matches_one_process(tiny_bert_dir, keyword_task_files, tmp_path):
    tasks = ["--tasks", *(f"{name}={train}::{test}" for name, (train, test) in keyword_task_files.items())]
    base = without_dropout(tiny_bert_dir, tmp_path / "bert")
    runs = {}
    for adapter in ("lora", "smora"):
        for processes in (1, 2):
            out = tmp_path / f"{adapter}{processes}"
            run_leanformer("finetune", "--base", str(base), *tasks, "--adapter", adapter, *FINETUNE,
                           "--out", str(out), processes=processes)
            runs[adapter, processes] = out
        one, two = (json.loads((runs[adapter, n] / "metrics.json").read_text()) for n in (1, 2))
        assert two["data_order_sha256"] == one["data_order_sha256"]
        assert_same_history(one["history"], two["history"], ("train_loss", "average_accuracy"))
        adapter_file = Path("adapter") / "adapter_model.safetensors"
        assert_same_weights(load_file(runs[adapter, 1] / adapter_file), load_file(runs[adapter, 2] / adapter_file))
        if adapter == "smora":  # the balance bias moved by the load of the whole global batch, in both processes
            assert two["routing"]["train"]["tokens"] == one["routing"]["train"]["tokens"]

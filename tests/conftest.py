"""Shared test helpers: the reference fixtures in ../shared/fixtures and small builders."""

from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

if not torch.cuda.is_available():
    # Triton's interpreter runs the GPU kernels on CPU tensors; it is read when a kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
# real processes run single-threaded: two of them share this machine's cores, and their sums reduce alike
PROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run on a machine with a CUDA GPU and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Send CPU tensors through the Triton kernels (run by the interpreter) for the duration of a test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    monkeypatch.setenv("LEANFORMER_TRITON", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_leanformer(*args: str, processes: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """``leanformer ARGS`` in a real process, or under torchrun with ``processes`` > 1; asserts it succeeded."""
    launcher = ([] if processes == 1 else
                ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())])
    proc = subprocess.run([sys.executable, *launcher, "-m", "leanformer", *args], capture_output=True, text=True,
                          env=PROCESS_ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_reference_fixture(name: str) -> dict:
    """A fixture's reference state dict, input, expected features/logits and constructor config."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"reference fixture {path} is not available")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return {
            "config": json.loads(f.metadata()["config"]),
            "state": {k.removeprefix("state."): f.get_tensor(k) for k in keys if k.startswith("state.")},
            "input": f.get_tensor("input"),
            "features": f.get_tensor("features"),
            "logits": f.get_tensor("logits"),
        }


def assert_rejects_bad_images(model: torch.nn.Module, size: int) -> None:
    """Wrong channel count, too-small image and wrong rank each raise a ValueError that says so."""
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, size, size))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        model(torch.randn(1, 3, 2, size))
    with pytest.raises(ValueError, match="NCHW"):
        model(torch.randn(3, size, size))


COPY_KINDS = ("deepcopy", "pickle")


def round_trip(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """A copy of ``model`` by ``copy.deepcopy`` or by ``torch.save`` + ``torch.load`` of the whole module (pickle:
    the user's own trusted file, hence weights_only=False)."""
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- a tiny BERT and two learnable text-classification tasks (multi-task fine-tuning tests) -------------------

FILLER = ("the", "a", "movie", "day", "was", "very", "it", "and", "quite", "this", "some", "news", "of", "on")
SENTIMENT = {"pos": "good", "neg": "bad"}
TOPIC = {"sports": "ball", "politics": "vote", "business": "stock"}


def keyword_examples(keywords: dict[str, str], count: int, seed: int) -> list[tuple[str, str]]:
    """(text, label) pairs: a few filler words with the label's keyword somewhere among them."""
    gen = torch.Generator().manual_seed(seed)
    labels = list(keywords)
    examples = []
    for i in range(count):
        label = labels[i % len(labels)]
        words = [FILLER[int(j)] for j in torch.randint(len(FILLER), (int(torch.randint(3, 7, (1,), generator=gen)),),
                                                          generator=gen)]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=gen)), keywords[label])
        examples.append((" ".join(words), label))
    return examples


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32, FFN 64, random weights) with a word-level BertTokenizer, in save_pretrained
    layout; nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({*FILLER, *SENTIMENT.values(), *TOPIC.values()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def keyword_task_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Two tasks, name -> (train, test): sentiment (TSV with a header, 40/20 lines) and topic (TSV without a
    header, 42/21 lines); each label is given away by one keyword, so a few dozen steps learn them."""
    folder = tmp_path_factory.mktemp("tasks")
    layouts = (("sentiment", SENTIMENT, "sentence\tlabel\n", 40), ("topic", TOPIC, "", 42))
    files = {}
    for name, keywords, header, count in layouts:
        paths = []
        for split, size, seed in (("train", count, 1), ("test", count // 2, 2)):
            rows = keyword_examples(keywords, size, seed + len(name))
            paths.append(folder / f"{name}_{split}.tsv")
            paths[-1].write_text(header + "".join(f"{text}\t{label}\n" for text, label in rows))
        files[name] = tuple(paths)
    return files

"""Hugging Face causal LM folders, shared by the jobs and commands that read them: a folder is checked to be one
before any slower work, a GGUF file (llama.cpp's format) becomes one once (then cached), weights load with
nothing downloaded and a damaged or hostile file in one line, and transformers' progress bars are switched
only inside a block (their switch is process-wide)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ._loading import causal_lm_folder, hf_from_pretrained

__all__ = ["causal_lm_folder_of", "check_causal_lm_folder", "check_vocab", "hf_progress_bars", "load_causal_lm"]


def check_causal_lm_folder(folder: Path) -> None:
    """Refuse, naming the file, a folder that is not a Hugging Face causal LM in save_pretrained layout."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json; expected a Hugging Face causal LM folder (save_pretrained "
                         "layout)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ValueError(f"{config_path}: architectures {architectures!r} is not a causal language model "
                         "(expected a *ForCausalLM such as LlamaForCausalLM)")


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' loading/saving bars inside the block; its switch is process-wide, so the
    previous setting is put back afterwards."""
    from transformers.utils import logging as hf_logging  # imported here: transformers is slow to import

    were_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if were_enabled else hf_logging.disable_progress_bar)()


def causal_lm_folder_of(path: Path, progress: bool) -> Path:
    """The Hugging Face folder of ``path``: the folder, or the cached conversion of a GGUF file (made on first
    use, with transformers' progress bars when ``progress``); checked to be a causal LM before any slower work."""
    if path.is_file():
        with hf_progress_bars(progress):
            path = causal_lm_folder(path)
    elif not path.is_dir():
        raise ValueError(f"{path}: no such folder or GGUF file")
    check_causal_lm_folder(path)
    return path


def load_causal_lm(folder: Path) -> nn.Module:
    """A Hugging Face causal LM from a local folder (nothing is downloaded); a missing, damaged (truncated
    safetensors) or hostile (a pickle carrying code) weights file is one ValueError naming the folder."""
    from transformers import AutoModelForCausalLM

    return hf_from_pretrained(AutoModelForCausalLM, folder)


def check_vocab(model: nn.Module, folder: Path, tokens: Iterable[torch.Tensor], source: str) -> None:
    """Refuse token ids the model's embedding cannot hold (bytes fed to a model with a smaller vocabulary),
    naming the config and where the tokens came from."""
    largest = max(int(part.max()) for part in tokens)
    if largest >= model.config.vocab_size:
        raise ValueError(f"{folder / 'config.json'}: vocab_size={model.config.vocab_size} is too small for the "
                         f"data, token id {largest} in {source}")

"""A causal LM folder as `leanformer sparsify` left it, for `leanformer generate` and `leanformer predictors`.

sparsify saves the model with ``config.hidden_act = "relu"`` and records its FATReLU threshold in
``sparsity.json`` (``config.threshold``); ``from_pretrained`` gives ReLU, so the threshold is applied again here
and both commands see exactly the sparsified model.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..data import load_tokenizer
from ..sparsity import relufy
from .sparsify import check_causal_lm_folder, hf_progress_bars, load_causal_lm

SPARSITY_FILE = "sparsity.json"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --threshold, the same in every command that loads a sparsified causal LM."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="Hugging Face causal LM folder (save_pretrained layout), e.g. written by "
                        "`leanformer sparsify`")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"FATReLU threshold applied to the ReLU model (default: the one `leanformer sparsify` "
                        f"recorded in DIR/{SPARSITY_FILE}; without that file, ReLU as loaded)")


@dataclass(frozen=True)
class CausalLM:
    """The loaded model (eval mode), its tokenizer (None: bytes as tokens) and what its FFNs compute."""

    model: nn.Module
    tokenizer: Any | None
    activation: str


def _check_threshold(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={value!r}: expected a finite number >= 0")
    return float(value)


def recorded_threshold(folder: Path) -> float | None:
    """The FATReLU threshold in ``folder/sparsity.json`` (``config.threshold``), or None without file or field."""
    path = folder / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    config = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(config, dict) or "threshold" not in config:
        return None
    return _check_threshold(config["threshold"], f"{path}: config.threshold")


def check_model_folder(folder: Path) -> None:
    """Refuse a --model that is not a causal LM folder, before any slower work."""
    if not folder.is_dir():
        raise ValueError(f"--model {folder}: no such folder")
    check_causal_lm_folder(folder)


def load_sparsified_lm(folder: Path, threshold: float | None, progress: bool, relu_needed_by: str | None = None
                       ) -> CausalLM:
    """Load ``folder`` (nothing downloaded) and apply FATReLU(threshold), by default the recorded one.

    A threshold > 0 needs a ReLU model (``config.hidden_act == "relu"``, as sparsify saves it): on any other
    activation FATReLU would replace what the model was trained with, so that is refused, as is any non-ReLU
    model when ``relu_needed_by`` names a use that needs one. Everything is checked before the weights load.
    """
    check_model_folder(folder)
    config_path = folder / "config.json"
    hidden_act = json.loads(config_path.read_text()).get("hidden_act")  # valid JSON: checked just above
    source = "--threshold"
    if threshold is None:
        threshold, source = recorded_threshold(folder), SPARSITY_FILE
    else:
        _check_threshold(threshold, "--threshold")
    if hidden_act != "relu" and (threshold or relu_needed_by):
        needs = (f"FATReLU (threshold {threshold:g} from {source}) applies to ReLU models" if threshold else
                 f"{relu_needed_by} needs a ReLU or FATReLU model")
        raise ValueError(f"{config_path}: hidden_act is {hidden_act!r}, but {needs}, as `leanformer sparsify` "
                         "saves them")
    with hf_progress_bars(progress):
        model = load_causal_lm(folder).eval()
    tokenizer = load_tokenizer(folder)
    if not threshold:
        return CausalLM(model, tokenizer, f"config.hidden_act {hidden_act!r}")
    relufy(model, "fatrelu", threshold)
    return CausalLM(model, tokenizer, f"FATReLU(threshold={threshold:g}) from {source}")

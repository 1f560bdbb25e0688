"""A causal LM folder as `leanformer sparsify` left it, for `leanformer generate` and `leanformer predictors`.

sparsify saves the model with `leanformer.save_pretrained`, which records its FFN activations (FATReLU and its
threshold) in config.json, so both commands see exactly the sparsified model. Folders from earlier versions (a
ReLU config plus the threshold in ``sparsity.json``, ``config.threshold``) get that threshold applied again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from .._checks import check_real
from ..data import load_tokenizer
from ..sparsity import load_pretrained, relufy
from ..sparsity.pretrained import CONFIG_KEY
from .sparsify import causal_lm_folder_of, check_causal_lm_folder, hf_progress_bars, load_causal_lm

SPARSITY_FILE = "sparsity.json"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --threshold, the same in every command that loads a sparsified causal LM."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR|GGUF",
                        help="Hugging Face causal LM folder (save_pretrained layout), e.g. written by "
                        "`leanformer sparsify`, or a GGUF file (llama.cpp's format: dequantized to fp32 once, then "
                        "cached in $LEANFORMER_CACHE, default ~/.cache/leanformer)")
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
    return float(check_real(where, value, 0))


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


def model_folder(args: argparse.Namespace) -> Path:
    """``args.model`` as a causal LM folder (a GGUF file converted once, then cached), replacing it in ``args``."""
    args.model = causal_lm_folder_of(args.model, not getattr(args, "no_progress", False))
    return args.model


def load_sparsified_lm(folder: Path, threshold: float | None, progress: bool, relu_needed_by: str | None = None
                       ) -> CausalLM:
    """Load ``folder`` (nothing downloaded) with the FFN activations it was saved with, or FATReLU(threshold).

    A folder whose config.json records its activations (`leanformer.save_pretrained`, as sparsify writes it) is
    loaded exactly; an older sparsify folder (a ReLU config plus the threshold in sparsity.json) gets its recorded
    threshold. A threshold > 0 needs a ReLU/FATReLU model: on any other activation FATReLU would replace what the
    model was trained with, so that is refused, as is any non-ReLU model when ``relu_needed_by`` names a use that
    needs one. Everything is checked before the weights load.
    """
    check_model_folder(folder)
    config_path = folder / "config.json"
    values = json.loads(config_path.read_text())  # valid JSON: checked just above
    record = values.get(CONFIG_KEY)
    relu, described, problem = _ffn_activations(values, record, config_path)
    source = "--threshold"
    if threshold is None and record is None:
        threshold, source = recorded_threshold(folder), SPARSITY_FILE
    elif threshold is not None:
        _check_threshold(threshold, "--threshold")
    if not relu and (threshold or relu_needed_by):
        needs = (f"FATReLU (threshold {threshold:g} from {source}) applies to ReLU models" if threshold else
                 f"{relu_needed_by} needs a ReLU or FATReLU model")
        raise ValueError(f"{config_path}: {problem}, but {needs}, as `leanformer sparsify` saves them")
    with hf_progress_bars(progress):
        model = (load_causal_lm(folder) if record is None else load_pretrained_lm(folder)).eval()
    tokenizer = load_tokenizer(folder)
    if not threshold:
        return CausalLM(model, tokenizer, described)
    relufy(model, "fatrelu", threshold)
    return CausalLM(model, tokenizer, f"FATReLU(threshold={threshold:g}) from {source}")


def _ffn_activations(values: dict, record: object, config_path: Path) -> tuple[bool, str, str]:
    """(whether every FFN is ReLU or FATReLU, what they are in words, and the same as a reason to refuse) from a
    folder's config.json."""
    if record is None:
        hidden_act = values.get("hidden_act")
        return hidden_act == "relu", f"config.hidden_act {hidden_act!r}", f"hidden_act is {hidden_act!r}"
    activations = record.get("activations") if isinstance(record, dict) else None
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(activations, dict) or not (activations or inputs):
        raise ValueError(f"{config_path}: {CONFIG_KEY}.activations must be a non-empty object")
    if not activations:
        described = f"TEAL input thresholds on {len(inputs)} Linears from config.json"
        return False, described, described
    entries = list(activations.values())
    relu = all(isinstance(e, dict) and e.get("act") in ("relu", "fatrelu") and "topk" not in e for e in entries)
    kinds = sorted({json.dumps(e, sort_keys=True) for e in entries})
    described = f"FFN activations {', '.join(kinds)} from config.json"
    return relu, described, described


def load_pretrained_lm(folder: Path) -> nn.Module:
    """`leanformer.load_pretrained` of a causal LM folder, its errors naming the folder."""
    try:
        return load_pretrained(folder)
    except ValueError as err:
        raise ValueError(f"--model {folder}: {err}") from err

"""The --model and --threshold options of the commands that read a sparsified causal LM (`generate`,
`predictors`); the folder itself is read by `leanformer.sparsity.load_sparsified_lm`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._hf import causal_lm_folder_of
from ..sparsity import SPARSITY_FILE


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --threshold, the same in every command that loads a sparsified causal LM."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR|GGUF",
                        help="Hugging Face causal LM folder (save_pretrained layout), e.g. written by "
                        "`leanformer sparsify`, or a GGUF file (llama.cpp's format: dequantized to fp32 once, then "
                        "cached in $LEANFORMER_CACHE, default ~/.cache/leanformer)")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"FATReLU threshold applied to the ReLU model (default: the one `leanformer sparsify` "
                        f"recorded in DIR/{SPARSITY_FILE}; without that file, ReLU as loaded)")


@contextmanager
def reading_model() -> Iterator[None]:
    """Inside the block, an error reading the --model folder or file is named by the option, as every flag's is."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"--model {err}") from err


def model_folder(args: argparse.Namespace) -> Path:
    """``args.model`` as a causal LM folder (a GGUF file converted once, then cached), replacing it in ``args``."""
    with reading_model():
        args.model = causal_lm_folder_of(args.model, not getattr(args, "no_progress", False))
    return args.model

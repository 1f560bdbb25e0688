"""`leanformer tune`: measure again, on this machine, the fast-path choices leanformer caches per machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._io import dumps_json
from .._tuning import cache_path, forget
from ..sparsity import best_decode_layout

DESCRIPTION = (
    "leanformer picks fast paths by timing them on the machine that runs them (the compiled decoder's weight "
    "layout per model shape; oneDNN or BLAS for each Linear shape of the backbones; the share of units up to which "
    "a sparse FFN beats the dense one and whether the compiled or the PyTorch sparse kernels do it better, "
    "sparsify_for_inference's max_active='auto') and caches each choice per CPU "
    "(vendor, family, model, flags), torch version and thread count in $LEANFORMER_CACHE/tuning/. A choice is "
    "measured the first time it is needed; this command forgets all of this machine's choices (each is measured "
    "again when next needed), measures the decoder layout for --model (or the shapes given) now, and prints the "
    "cache. --show prints it without measuring or forgetting."
)


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="re-measure the fast-path choices cached for this machine", description=DESCRIPTION)
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a Hugging Face LLaMA-family folder whose decoder layout to measure (its config.json)")
    p.add_argument("--shape", action="append", default=[], metavar="HIDDENxFFN",
                   help="a layer shape to measure the decoder layout for, e.g. 576x1536 (repeatable)")
    p.add_argument("--show", action="store_true", help="print the cached choices and measure nothing")
    p.set_defaults(run=run)


def _shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    shapes = []
    for text in args.shape:
        hidden, sep, ffn = text.partition("x")
        if not (sep and hidden.isdigit() and ffn.isdigit() and int(hidden) > 0 and int(ffn) > 0):
            raise ValueError(f"--shape {text!r}: expected HIDDENxFFN, two positive integers such as 576x1536")
        shapes.append((int(hidden), int(ffn)))
    if args.model is not None:
        path = args.model / "config.json"
        try:
            config = json.loads(path.read_text())
            shapes.append((int(config["hidden_size"]), int(config["intermediate_size"])))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--model {args.model}: no config.json with hidden_size and intermediate_size "
                             f"({type(err).__name__}: {err})") from err
    return shapes


def run(args: argparse.Namespace) -> int:
    path = cache_path()
    if not args.show:
        shapes = _shapes(args)
        if not shapes:
            raise ValueError("nothing to measure: give --model DIR or --shape HIDDENxFFN (or --show)")
        forget()
        for hidden, ffn in shapes:
            print(f"decoder layout for {hidden}x{ffn}: {best_decode_layout(hidden, ffn)}")
    payload = json.loads(path.read_text()) if path.is_file() else {"choices": {}}
    print(f"{path}:")
    print(dumps_json(payload["choices"]))
    return 0

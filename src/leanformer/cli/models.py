"""`leanformer models`: the registered backbones with their parameter counts and FLOPs."""

from __future__ import annotations

import argparse

import torch

from .._io import dumps_json
from ..models import create_model, list_models


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the backbones with parameters and FLOPs",
                       description="List the registered backbones with parameter counts and FLOPs "
                       "(multiply-accumulates per image at the variant's default input size).")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'swin_*' (default: all)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size used for the counts (default 1000)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(run=run)


def describe(name: str, num_classes: int) -> dict:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = create_model(name, num_classes=num_classes)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "img_size": model.img_size,
        "gmacs": round(model.flops() / 1e9, 3),
    }


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; known: {', '.join(list_models())}")
    rows = [describe(name, args.num_classes) for name in names]
    if args.json:
        print(dumps_json(rows))
        return 0
    print(f"{'model':<34} {'params':>13} {'img':>5} {'GMACs':>8}")
    for row in rows:
        print(f"{row['model']:<34} {row['params']:>13,} {row['img_size']:>5} {row['gmacs']:>8.3f}")
    return 0

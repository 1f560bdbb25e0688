"""`leanformer forward`: one forward pass of a backbone on a batch of real images, timed."""

from __future__ import annotations

import argparse
import time

import torch

from .._io import dumps_json
from ..data import digits
from ..models import create_model
from ._options import check_positive


def add_parser(sub) -> None:
    p = sub.add_parser("forward", help="run a backbone on a batch of the embedded digits",
                       description="Build a backbone for the embedded digits data (1 channel, 10 classes), "
                       "run it on one batch and report output shape, time and images/s.")
    p.add_argument("--model", default="swin_tiny_patch4_window7_224", help="registered model name")
    p.add_argument("--data", default="digits", choices=["digits"], help="dataset (default: the embedded digits)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images in the batch, at most as many as the digits' validation split holds (default 8)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--checkpoint", default=None, help="weights to load (.safetensors or .pth)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def check_batch(batch_size: int, available: int) -> None:
    """Refuse a batch larger than the images there are: a silently smaller batch would report the time and
    images/s of a batch other than the one asked for."""
    if batch_size > available:
        raise ValueError(f"--batch-size={batch_size}: the digits' validation split has {available} images; "
                         f"expected at most {available}")


def run(args: argparse.Namespace) -> int:
    check_positive(("--batch-size", args.batch_size))
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model = create_model(args.model, checkpoint_path=args.checkpoint, in_chans=digits.IN_CHANS,
                         num_classes=digits.NUM_CLASSES, **overrides).eval()
    _, val = digits.load_digits_split(model.img_size)
    check_batch(args.batch_size, len(val))
    images, labels = val.tensors[0][: args.batch_size], val.tensors[1][: args.batch_size]
    with torch.inference_mode():
        model(images)  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        logits = model(images)
        seconds = time.perf_counter() - start
    result = {
        "model": args.model,
        "input": list(images.shape),
        "logits": list(logits.shape),
        "seconds": round(seconds, 4),
        "images_per_s": round(len(images) / seconds, 1),
        "predicted": logits.argmax(1).tolist(),
        "labels": labels.tolist(),
    }
    if args.json:
        print(dumps_json(result))
    else:
        print(f"{args.model}: input {tuple(images.shape)} -> logits {tuple(logits.shape)} in {seconds * 1e3:.1f} ms "
              f"({result['images_per_s']} images/s)")
        print(f"labels    {result['labels']}\npredicted {result['predicted']} (untrained unless --checkpoint)")
    return 0

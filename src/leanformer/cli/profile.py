"""`leanformer profile`: how many bytes one training forward keeps for backward, per module."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from .._io import atomic_write, check_writable_file, dumps_json
from ..memory import COMPRESSION_PRESETS, CompressionConfig, compress_activations, saved_activation_bytes
from ..models import create_model
from ._options import check_positive


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="saved-activation memory per module, exact vs compressed",
                       description="Run one training forward of a backbone on a random batch and report the bytes "
                       "autograd keeps for backward, per module: exact storage vs what --compress stores. "
                       "Writes a PNG bar chart.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="swin_tiny_patch4_window7_224", help="registered model name")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images in the batch")
    p.add_argument("--compress", default="int8", choices=tuple(COMPRESSION_PRESETS),
                   help="storage of saved activations")
    p.add_argument("--depth", type=int, default=2,
                   help="aggregate module names to this many dotted levels (0: one row for the whole model)")
    p.add_argument("--plot", type=Path, default=Path("profile.png"), help="where to write the bar chart")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def aggregate(per_module: dict[str, dict[str, int]], depth: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"stored": 0, "original": 0})
    for name, entry in per_module.items():
        key = ".".join(name.split(".")[:depth]) if depth > 0 else "<all>"
        out[key]["stored"] += entry["stored"]
        out[key]["original"] += entry["original"]
    return dict(out)


def plot(rows: dict[str, dict[str, int]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [rows[n]["original"] / 2**20 for n in names], height=0.4, label="exact", color="#999")
    ax.barh([i + 0.2 for i in y], [rows[n]["stored"] / 2**20 for n in names], height=0.4, label="stored",
            color="#2a6fdb")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("MiB kept for backward")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    check_positive(("--batch-size", args.batch_size))
    if args.depth < 0:
        raise ValueError(f"--depth={args.depth}: expected 0 (one row for the whole model) or more dotted levels")
    check_writable_file(args.plot, "--plot")
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model = create_model(args.model, **overrides).train()
    config = CompressionConfig.from_name(args.compress)
    if config is not None:
        compress_activations(model, config)
    x = torch.randn(args.batch_size, model.in_chans, model.img_size, model.img_size)
    with saved_activation_bytes(model) as report:
        loss = model(x).sum()
    del loss
    rows = aggregate(report.per_module, args.depth)
    title = (f"{args.model}, batch {args.batch_size} at {model.img_size}px, {args.compress}: "
             f"{report.stored_bytes / 2**20:.1f} MiB stored vs {report.original_bytes / 2**20:.1f} MiB exact "
             f"({report.ratio:.3f}x)")
    plot(rows, title, args.plot)
    if args.json:
        print(dumps_json({"model": args.model, "compress": args.compress, **report.to_dict(), "plot": str(args.plot)}))
        return 0
    width = max(len(n) for n in rows)
    print(f"{'module':<{width}}  {'exact MiB':>10}  {'stored MiB':>10}  {'ratio':>6}")
    for name, entry in rows.items():
        ratio = entry["stored"] / entry["original"] if entry["original"] else 1.0
        print(f"{name:<{width}}  {entry['original'] / 2**20:>10.2f}  {entry['stored'] / 2**20:>10.2f}  {ratio:>6.3f}")
    print(title)
    print(f"plot: {args.plot}")
    return 0

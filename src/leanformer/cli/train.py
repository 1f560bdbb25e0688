"""`leanformer train`: train a backbone on digits, MNIST idx files or an image folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .._io import check_writable_dir, dumps_json
from .._machine import check_fits_in_memory
from ..data import digits
from ..engine import DEVICES, CheckpointWriteError, load_checkpoint_folder, resolve_resume_folder, resume_run_folder
from ..memory import COMPRESSION_PRESETS, CompressionConfig, compress_activations, saved_activation_bytes
from ..models import is_model, model_entrypoint, weight_bytes
from ..train import TrainConfig, Trainer
from ._options import add_config_options, given_options

DEFAULTS = TrainConfig()
# what the run writes in --output (train.loop.RUN_OUTPUTS): checked before training, so none is found unwritable after
OUTPUT_FOLDERS, OUTPUT_FILES = ("last", "best"), ("result.json",)
# AdamW training holds, per weight, the weight, its gradient and two moments
TRAINING_STATE_FACTOR = 4

# CLI option -> (TrainConfig field, help). Defaults are shown from TrainConfig, the one source of truth.
OPTIONS = {
    "--model": ("model", str, "registered backbone to train (see `leanformer models`)"),
    "--data": ("data", str, "'digits' (embedded, default), a folder of MNIST idx files (.gz is fine), "
               "or an image folder with one subfolder per class (optionally train/ and val/)"),
    "--epochs": ("epochs", int, "number of passes over the training split"),
    "--batch-size": ("batch_size", int, "global batch size, split evenly across torchrun processes"),
    "--lr": ("lr", float, "peak learning rate of AdamW after warmup (cosine decay to --min-lr)"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine schedule"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not applied to norms, biases, position tables)"),
    "--warmup-epochs": ("warmup_epochs", float, "epochs of linear learning-rate warmup"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing of the cross-entropy loss"),
    "--clip-grad": ("clip_grad", float, "clip the gradient norm to this value"),
    "--img-size": ("img_size", int, "input size images are resized to (default: the data's natural size)"),
    "--val-fraction": ("val_fraction", float, "share of the data held out for validation when the data has no split"),
    "--seed": ("seed", int, "seed for model init, data split and order: equal seeds give equal runs on CPU"),
    "--workers": ("workers", int, "DataLoader worker processes"),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a backbone (the main job)",
        description="Train a backbone with AdamW (warmup + cosine), label smoothing and gradient clipping, "
        "evaluating every epoch and checkpointing last/ and best/ under --output. With no options: a compact "
        "Swin on the embedded digits. Multi-process: torchrun --nproc_per_node N -m leanformer train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_options(p, OPTIONS, DEFAULTS)
    p.add_argument("--compress", choices=tuple(COMPRESSION_PRESETS), default=None,
                   help="store activations saved for backward in 8/4/2 bits (Mesa) or exactly (default: none)")
    p.add_argument("--model-arg", dest="model_args", action="append", default=None, metavar="KEY=VALUE",
                   help="override a model constructor argument, VALUE as JSON (repeatable), "
                   "e.g. --model-arg drop_path_rate=0 --model-arg 'depths=[2,2,2]'")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for checkpoints (last/, best/) and result.json (default: runs/train-<time>); "
                   "an --output that already holds a checkpoint or results of another run is refused (see "
                   "--overwrite), and so is one in use by another process (each run holds its folder's lock, "
                   "--output/.lock)")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue the run saved in this folder exactly (its configuration is reused; "
                   "only --epochs and --workers may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output: its last/, best/ and result.json are deleted "
                   "before training starts (never while another process is writing them)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train: 'auto' is a CUDA GPU where there is one (one per torchrun process), else "
                   "the CPU; 'cuda' without a GPU is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(run=run)


def parse_model_args(items: list[str] | None) -> dict:
    """`KEY=VALUE` strings -> dict, VALUE parsed as JSON (bare words stay strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. drop_path_rate=0.1")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """(the run's TrainConfig, its --compress): given, or read back from the run being resumed."""
    given = given_options(args, OPTIONS)
    if args.model_args:
        given["model_kwargs"] = parse_model_args(args.model_args)
    if args.compress is not None:
        given["compress"] = args.compress
    if args.resume is None:
        compress = given.pop("compress", "none")
        return TrainConfig.from_dict({**DEFAULTS.to_dict(), **given}), compress
    _, meta = load_checkpoint_folder(resolve_resume_folder(args.resume), require=("config",))
    saved = {"compress": "none", **meta["config"]}
    fixed = sorted(k for k, v in given.items() if k not in ("epochs", "workers") and v != saved.get(k))
    if fixed:
        raise ValueError(f"--resume reuses the saved configuration; cannot change {', '.join(fixed)}")
    values = {**saved, **given}
    compress = values.pop("compress")
    return TrainConfig.from_dict(values), compress


def compression(compress: str) -> list:
    """The Trainer transform of ``--compress`` (none: no transform)."""
    config = CompressionConfig.from_name(compress)
    return [] if config is None else [lambda model: compress_activations(model, config)]


def default_output(resume: Path | None) -> Path:
    """A new timestamped folder, or the run folder being resumed."""
    if resume is None:
        return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    return resume_run_folder(resume)


def check_training_fits(config: TrainConfig) -> None:
    """Refuse, before the data loads (an image folder can take minutes), a model whose training state cannot fit:
    weights, gradients and AdamW's two moments, `TRAINING_STATE_FACTOR` times the weights, found by building the
    model on the meta device. Activations come on top; the estimate is a floor, not a promise."""
    weights = _weight_bytes(config)
    if weights is not None:
        check_fits_in_memory(TRAINING_STATE_FACTOR * weights,
                             f"training {config.model} (weights, gradients and AdamW's two moments, "
                             f"{TRAINING_STATE_FACTOR} x {weights / 2**30:,.1f} GiB of weights)")


def _weight_bytes(config: TrainConfig) -> int | None:
    """The weights' bytes of the model as the run would build it, or None where that cannot be told yet.

    The data decides the input channels and classes: the embedded digits' are known, other data's are not read
    yet and the model's defaults stand in for them (their weights are a small part of any model large enough to
    matter here). A model that fails to build is left to `create_model`, which reports it with the data's values.
    """
    if not is_model(config.model):
        return None
    data = {"in_chans": digits.IN_CHANS, "num_classes": digits.NUM_CLASSES} if config.data == "digits" else {}
    size = {} if config.img_size is None else {"img_size": config.img_size}
    kwargs = {**data, **size, **config.model_kwargs}
    try:
        return weight_bytes(lambda: model_entrypoint(config.model)(**kwargs))
    except Exception:  # noqa: BLE001 (any failure here is create_model's to report, with the data's arguments)
        return None


def fit(trainer: Trainer, resume: Path | None, output: Path):
    """``trainer.fit``, a failed checkpoint write (disk full) said with how to go on from the one kept."""
    try:
        return trainer.fit(resume=resume)
    except CheckpointWriteError as err:
        hint = f" (continue with --resume {output})" if (output / "last" / "meta.json").is_file() else ""
        raise CheckpointWriteError(f"{err}: training stopped{hint}") from err


def run(args: argparse.Namespace) -> int:
    config, compress = build_config(args)
    output = args.output or default_output(args.resume)
    check_writable_dir(output, "--output" if args.output or args.resume is None else "--resume",
                       OUTPUT_FOLDERS, OUTPUT_FILES)
    check_training_fits(config)
    trainer = Trainer(config, output=output, transforms=compression(compress), progress=not args.no_progress,
                      overwrite=args.overwrite, settings={"compress": compress},
                      activation_meter=saved_activation_bytes, device=args.device)
    result = fit(trainer, args.resume, output)
    if result.rank != 0:
        return 0
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    if args.json:
        print(dumps_json(summary))
        return 0
    rows = [
        ("model", config.model), ("data", config.data), ("parameters", f"{result.params:,}"),
        ("processes", result.world_size), ("epochs run", result.epochs_run),
        ("best val accuracy", f"{result.best_val_acc:.4f}"), ("final val accuracy", f"{result.final_val_acc:.4f}"),
        ("train time", f"{result.seconds:.1f} s"), ("time per step", f"{result.seconds_per_step * 1e3:.1f} ms"),
        ("throughput", f"{result.images_per_s:.0f} images/s"), ("peak memory", f"{result.peak_memory_mb:.0f} MB"),
        ("saved activations", f"{result.saved_activation_mb:.1f} MiB per step ({compress}: "
                              f"{result.saved_activation_ratio:.3f}x exact)"),
        ("checkpoints", f"{output}/last, {output}/best"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0

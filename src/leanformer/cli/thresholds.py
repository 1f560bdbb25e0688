"""`leanformer thresholds`: training-free activation sparsity (TEAL or CATS) for a causal LM, calibrated on text."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from .._hf import causal_lm_folder_of, check_vocab, hf_progress_bars, load_causal_lm
from .._io import check_writable_dir, dumps_json, write_files_atomic, write_json_atomic
from .._runfolder import claim_run_folder
from ..data import lm_eval_batches, load_text, load_tokenizer
from ..sparsity import THRESHOLD_ALLOCATIONS as ALLOCATIONS
from ..sparsity import THRESHOLD_METHODS as METHODS
from ..sparsity import ThresholdConfig, calibrate_thresholds, causal_lm_loss, save_pretrained, threshold_sparsity
from ._causal_lm import reading_model
from ._options import check_positive

REPORT = "thresholds.json"
RUN_OUTPUTS = (REPORT, "config.json", "model.safetensors")

DESCRIPTION = (
    "Zero the small activations of a causal LM that was never ReLU-trained, without training: TEAL thresholds the "
    "input of every Linear in the blocks, CATS the output of each FFN's activation. Thresholds are calibrated on "
    "--data (its first part; the last --val-fraction is held out and reports the perplexity and the sparsity "
    "reached there) for a model-wide --sparsity: the share of the blocks' weight reads a decoder skips. --allocation "
    "greedy (default) gives each kind of projection its own level, searched on the loss (a few minutes for a 135M "
    "model); uniform gives every one the same. The model is saved to --out with its thresholds recorded "
    "(leanformer.load_pretrained reloads them; a plain from_pretrained refuses), ready for `leanformer generate`, "
    "which decodes it with the compiled decoder and skips the zeroed weights."
)


def add_parser(sub) -> None:
    p = sub.add_parser("thresholds", help="training-free activation sparsity (TEAL or CATS) calibrated on text",
                       description=DESCRIPTION)
    p.add_argument("--model", type=Path, required=True, metavar="DIR|GGUF",
                   help="Hugging Face causal LM folder or GGUF file (converted once, then cached)")
    p.add_argument("--data", type=Path, required=True, help="UTF-8 text to calibrate on and to evaluate")
    p.add_argument("--method", choices=METHODS, default="teal", help="(default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.4, help="model-wide target in [0, 1) (default: %(default)s)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="greedy", help="(default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data (default: %(default)s)")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="tokens of --data calibrated on, in 256-token windows (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/thresholds-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_positive(("--calibration-tokens", args.calibration_tokens))
    config = ThresholdConfig(method=args.method, sparsity=args.sparsity, allocation=args.allocation)
    out = args.out or Path("runs") / time.strftime("thresholds-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out", (), RUN_OUTPUTS)
    progress = not args.no_progress
    with reading_model():
        folder = causal_lm_folder_of(args.model, progress)
        with hf_progress_bars(progress):
            model = load_causal_lm(folder).eval()
    tokenizer = load_tokenizer(folder)
    text = load_text(args.data, args.val_fraction, 256, tokenizer)
    check_vocab(model, folder, (text.train, text.val), text.source)
    tokens = text.train[: args.calibration_tokens + 1]
    if len(tokens) < 258:
        raise ValueError(f"--data {args.data}: {len(tokens)} calibration tokens; expected at least 258")
    calibration = lm_eval_batches(tokens, 2, 256)
    held_out = lm_eval_batches(text.val[:4097], 2, 256)
    with claim_run_folder(out, RUN_OUTPUTS, overwrite=args.overwrite, resumable=False):
        report = calibrate_thresholds(model, calibration, config, progress=progress)
        measured = threshold_sparsity(model, held_out)
        with torch.no_grad():
            held_out_loss = sum(float(causal_lm_loss(model, b)) for b in held_out) / len(held_out)
        with hf_progress_bars(progress):
            save_pretrained(model, out)
            if tokenizer is not None:
                write_files_atomic(out, tokenizer.save_pretrained)
        payload = {"model": str(args.model), "data": text.source, "config": dataclasses.asdict(config),
                   "held_out_sparsity": measured["model_wide"], "held_out_loss": held_out_loss,
                   **report.to_dict()}
        write_json_atomic(out / REPORT, payload)
    if args.json:
        print(dumps_json(payload))
        return 0
    print(f"{args.method} ({args.allocation}) thresholds for {args.sparsity:.0%} model-wide sparsity -> {out}")
    print(f"calibration loss {report.loss_dense:.4f} -> {report.loss_sparse:.4f}; held-out sparsity "
          f"{measured['model_wide']:.1%}, held-out loss {held_out_loss:.4f}")
    return 0

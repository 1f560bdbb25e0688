"""`leanformer predictors`: train the activation predictors of a sparsified causal LM (for `generate`)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .._hf import check_vocab
from .._io import check_writable_dir, dumps_json, write_json_atomic
from .._runfolder import claim_run_folder
from ..data import lm_batches, lm_eval_batches, load_text
from ..sparsity import (
    PREDICTORS_FILE,
    PredictorConfig,
    PredictorReport,
    evaluate_predictors,
    load_sparsified_lm,
    train_predictors,
)
from ._causal_lm import add_model_options, model_folder, reading_model
from ._options import add_config_options, check_positive, given_options

DEFAULTS = PredictorConfig()
REPORT_FILE = "predictors.json"

# CLI option -> (PredictorConfig field, type, help). Defaults are shown from PredictorConfig.
OPTIONS = {
    "--rank": ("rank", int, "rank of every predictor (default: the FFN's inputs // 32, at least 16)"),
    "--target-recall": ("target_recall", float, "share of the truly active units each layer's threshold must keep "
                        "on its held-out recorded tokens"),
    "--steps": ("steps", int, "Adam steps per layer"),
    "--lr": ("lr", float, "Adam learning rate"),
    "--train-batch-size": ("batch_size", int, "recorded tokens per Adam step"),
    "--max-tokens": ("max_tokens", int, "recorded tokens kept per layer (a random subsample if the windows hold more)"),
    "--calibration-fraction": ("val_fraction", float, "share of the recorded tokens held out to set each layer's "
                               "threshold"),
    "--seed": ("seed", int, "seed of the training windows, the subsample, the split, the initialisation and the "
               "training batches: equal seeds give equal predictors"),
}

DESCRIPTION = (
    "Train one low-rank activation predictor per FFN (Deja Vu / PowerInfer) of a Hugging Face causal LM folder "
    "whose FFN activation is ReLU or FATReLU, such as `leanformer sparsify` writes (its FATReLU threshold from "
    "DIR/sparsity.json is applied). The FFN inputs and which hidden units are nonzero are recorded on --batches "
    "random windows of the first 1 - --val-fraction of --data (a UTF-8 text file, encoded with the folder's "
    "tokenizer or as bytes), each predictor is trained with Adam on them and its threshold set to reach "
    "--target-recall; recall, precision and the true and predicted active shares are then measured on up to "
    "--batches batches of consecutive windows of the held-out last --val-fraction. Writes predictors.safetensors "
    "(what `leanformer generate --sparse predictor` reads) and predictors.json (the report) to --out."
)


def add_parser(sub) -> None:
    p = sub.add_parser("predictors", help="train activation predictors for `generate --sparse predictor`",
                       description=DESCRIPTION)
    add_model_options(p)
    p.add_argument("--data", required=True, help="UTF-8 text file; its last --val-fraction is held out")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for predictors.safetensors and predictors.json (default: the --model folder); one "
                   "that already holds them is refused (see --overwrite), and so is one in use by another process")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the predictors.safetensors and predictors.json already in --out")
    add_config_options(p, OPTIONS, DEFAULTS)
    p.add_argument("--batches", type=int, default=40,
                   help="batches of windows recorded for training, and at most as many evaluated on held-out text "
                   "(default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window (default: %(default)s)")
    # dests of their own: PredictorConfig's batch_size and val_fraction (--train-batch-size,
    # --calibration-fraction) count recorded tokens, these count windows and text
    p.add_argument("--batch-size", dest="windows", type=int, default=8, help="windows per batch (default: %(default)s)")
    p.add_argument("--val-fraction", dest="held_out", type=float, default=0.1,
                   help="share of the text held out for evaluation (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = PredictorConfig(**given_options(args, OPTIONS))
    check_positive(("--batches", args.batches), ("--seq-len", args.seq_len), ("--batch-size", args.windows))
    progress = not args.no_progress
    model_folder(args)
    out = args.out or args.model
    check_writable_dir(out, "--out" if args.out else "--model", files=(PREDICTORS_FILE, REPORT_FILE))
    with reading_model():
        lm = load_sparsified_lm(args.model, args.threshold, progress,
                                relu_needed_by="learning which hidden units are zero", threshold_name="--threshold")
    text = load_text(args.data, args.held_out, args.seq_len, lm.tokenizer)
    check_vocab(lm.model, args.model, (text.train, text.val), text.source)

    with claim_run_folder(out, (PREDICTORS_FILE, REPORT_FILE), overwrite=args.overwrite, resumable=False):
        windows = lm_batches(text.train, args.windows, args.seq_len, torch.Generator().manual_seed(config.seed))
        recorded = [inputs for inputs, _ in itertools.islice(windows, args.batches)]
        held_out = [inputs for inputs, _ in lm_eval_batches(text.val, args.windows, args.seq_len)[: args.batches]]
        bar = dict(unit="batch", leave=False, disable=not progress, file=sys.stderr)
        predictors, fit = train_predictors(lm.model, tqdm(recorded, desc="record", **bar), config, progress=progress)
        report = evaluate_predictors(lm.model, predictors, tqdm(held_out, desc="evaluate", **bar))
        path = predictors.save(out)
        payload = {"model": str(args.model), "activation": lm.activation, "data": text.source,
                   "predictors": str(path), "config": dataclasses.asdict(config),
                   "windows": {"batches": args.batches, "batch_size": args.windows, "seq_len": args.seq_len},
                   "recorded_tokens": sum(x.numel() for x in recorded),
                   "held_out_tokens": sum(x.numel() for x in held_out),
                   "held_out": report.to_dict(), "fit": fit.to_dict()}
        write_json_atomic(out / REPORT_FILE, payload)
    summarize(args, payload, report, out)
    return 0


def summarize(args: argparse.Namespace, payload: dict, report: PredictorReport, out: Path) -> None:
    if args.json:
        print(dumps_json(payload))
        return
    kept = min(payload["recorded_tokens"], payload["config"]["max_tokens"])
    print(f"{payload['model']} ({payload['activation']}): {payload['recorded_tokens']} tokens recorded ({kept} kept "
          f"per layer), {payload['held_out_tokens']} held-out tokens; data {payload['data']}")
    width = max(len("FFN"), *(len(layer.name) for layer in report.layers))
    print(f"{'FFN':<{width}}  {'recall':>7}  {'precision':>9}  {'true active %':>13}  {'predicted active %':>18}")
    for layer in report.layers:
        print(f"{layer.name:<{width}}  {layer.recall:>7.4f}  {layer.precision:>9.4f}  "
              f"{100 * layer.true_active_fraction:>13.2f}  {100 * layer.predicted_active_fraction:>18.2f}")
    print(f"held-out mean recall {report.mean_recall:.4f}; predicted sparsity {report.mean_predicted_sparsity:.4f} "
          f"(the share of units `generate --sparse predictor` skips)")
    print(f"written: {payload['predictors']}, {out / REPORT_FILE}")

"""`leanformer sparsify`: ProSparse on a Hugging Face causal LM folder or one of our backbones."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .._hf import causal_lm_folder_of, check_vocab, hf_progress_bars, load_causal_lm
from .._io import check_writable_dir, dumps_json, write_files_atomic, write_json_atomic
from .._runfolder import claim_run_folder
from ..data import lm_batches, lm_eval_batches, load_data, load_text, load_tokenizer
from ..engine import check_resume, process_group
from ..models import create_model, is_model
from ..sparsity import WEIGHTS_NAME, ProSparseConfig, ProSparseResult, prosparse, save_pretrained
from ._causal_lm import reading_model
from ._options import add_config_options, given_options

DEFAULTS = ProSparseConfig()
DEFAULT_VAL_FRACTION = 0.1
# what a run leaves in --out: a new run refuses a folder holding any of them (unless --overwrite deletes them)
OUTPUT_FOLDERS, OUTPUT_FILES = ("checkpoint",), ("sparsity.json", "sparsity.png", WEIGHTS_NAME, "config.json")
RUN_OUTPUTS = OUTPUT_FOLDERS + OUTPUT_FILES

# CLI option -> (ProSparseConfig field, type, help). Defaults are shown from ProSparseConfig.
OPTIONS = {
    "--steps": ("steps", int, "optimiser steps in total, the ReLU-only phase included"),
    "--relu-steps": ("relu_steps", int, "steps of step 1 (ReLU, no regularisation); default: the paper's share, "
                     "5000/16500 of --steps"),
    "--stages": ("stages", str, "regularisation stages of step 2 as JSON [[end_step, lambda], ...], end steps counted "
                 "from the end of the ReLU-only phase; default: ProSparse-7B's stages scaled to the steps left"),
    "--threshold": ("threshold", float, "FATReLU threshold of step 3 (0 keeps plain ReLU)"),
    "--lr": ("lr", float, "peak AdamW learning rate after warmup, cosine decay to --min-lr (the paper's 7B value; "
             "small models need more, e.g. 1e-3)"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine schedule"),
    "--warmup-steps": ("warmup_steps", int, "steps of linear learning-rate warmup"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not applied to norms and biases)"),
    "--clip-grad": ("clip_grad", float, "clip the gradient norm to this value"),
    "--batch-size": ("batch_size", int, "sequences (or images) per step"),
    "--seq-len": ("seq_len", int, "tokens per training sequence (language models)"),
    "--eval-every": ("eval_every", int, "evaluate loss and sparsity, and checkpoint, every this many steps"),
    "--seed": ("seed", int, "seed for the batches drawn and the model's randomness: equal seeds give equal runs"),
    "--normalization": ("normalization", str, "L1 term per layer: 'mean' over tokens and units, or the paper's 'sum'"),
}

DESCRIPTION = (
    "Make a model's FFN activations sparse with ProSparse (Song et al. 2024) in three steps: (1) the FFN "
    "activation (LLaMA's SiLU gate, a backbone's GELU) becomes ReLU and training continues for --relu-steps; "
    "(2) training goes on with an L1 penalty lambda * sum over layers of |x1| on the FFN intermediate activations, "
    "lambda raised stage by stage along sine curves (--stages, default ProSparse-7B's table scaled to --steps); "
    "(3) ReLU becomes FATReLU, which also zeroes activations below --threshold. --model is a Hugging Face causal "
    "LM folder (save_pretrained layout; --data a UTF-8 text file, bytes as tokens unless the folder has a "
    "tokenizer) or a registered backbone (--data as for `leanformer train`). The model is written to --out in the "
    "format it was read, with sparsity.json and sparsity.png; checkpoints in --out/checkpoint allow --resume. "
    "Multi-process: torchrun --nproc_per_node N -m leanformer sparsify ... (each process trains on its slice of "
    "every --batch-size batch; the first writes --out)."
)


def add_parser(sub) -> None:
    p = sub.add_parser("sparsify", help="make FFN activations sparse (ProSparse: ReLU, L1 schedule, FATReLU)",
                       description=DESCRIPTION)
    p.add_argument("--model", required=True,
                   help="Hugging Face causal LM folder (config.json + model.safetensors) or registered backbone name")
    p.add_argument("--data", default=None,
                   help="causal LM: a UTF-8 text file (the last --val-fraction is validation); backbone: 'digits' "
                   "(default), an MNIST idx folder or an image folder")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help=f"share of the data held out for evaluation (default: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--checkpoint", default=None,
                   help="backbone weights to start from (.safetensors or .pth, as `leanformer forward` reads)")
    p.add_argument("--img-size", type=int, default=None, help="backbone input size (default: the data's)")
    add_config_options(p, OPTIONS, DEFAULTS)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the sparsified model, sparsity.json, sparsity.png and checkpoint/ "
                   "(default: runs/sparsify-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --out/checkpoint (give the same options as the first run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint/, sparsity.json/png, model.safetensors and "
                   "config.json are deleted first); without it such a folder is refused, and a folder in use by "
                   "another process always is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-evaluation lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> ProSparseConfig:
    given = given_options(args, OPTIONS)
    if "stages" in given:
        try:
            given["stages"] = json.loads(given["stages"])
        except json.JSONDecodeError as err:
            raise ValueError(f"--stages {given['stages']!r}: not JSON ({err}); expected e.g. "
                             "[[100, 0.005], [400, 0.05]]") from err
    return ProSparseConfig(**given)


def _endless(dataset: Dataset, batch_size: int, seed: int) -> Iterator:
    """Shuffled epochs of ``dataset`` one after another, the order fixed by ``seed``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    out = args.out or Path("runs") / time.strftime("sparsify-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out", OUTPUT_FOLDERS, OUTPUT_FILES)
    checkpoint_dir = out / "checkpoint"
    check_resume(checkpoint_dir, args.resume, "--out")
    threshold, backbone = config.threshold, is_model(args.model)

    if backbone:
        data = load_data(args.data or "digits", img_size=args.img_size, val_fraction=args.val_fraction,
                         seed=config.seed)
        if len(data.train) < config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} is larger than the training set ({len(data.train)} "
                             "images)")
        model = create_model(args.model, checkpoint_path=args.checkpoint, in_chans=data.in_chans,
                             num_classes=data.num_classes, img_size=data.img_size)
        train_batches = _endless(data.train, config.batch_size, config.seed)
        eval_batches = DataLoader(data.val, batch_size=config.batch_size)
        source, tokenizer = data.source, None
    else:
        folder = Path(args.model)
        if not folder.exists():
            raise ValueError(f"--model {args.model!r}: not a registered backbone (see `leanformer models`) and no "
                             "such folder or GGUF file")
        with reading_model():
            folder = causal_lm_folder_of(folder, not args.no_progress)
        for flag, value in (("--checkpoint", args.checkpoint), ("--img-size", args.img_size)):
            if value is not None:
                raise ValueError(f"{flag} applies to registered backbones only, not to a Hugging Face folder")
        if args.data is None:
            raise ValueError("--data: a causal LM needs a UTF-8 text file to train on")
        with hf_progress_bars(not args.no_progress), reading_model():
            model = load_causal_lm(folder)
        tokenizer = load_tokenizer(folder)
        text = load_text(args.data, args.val_fraction, config.seq_len, tokenizer)
        check_vocab(model, folder, (text.train, text.val), text.source)
        train_batches = lm_batches(text.train, config.batch_size, config.seq_len,
                                   torch.Generator().manual_seed(config.seed))
        eval_batches = lm_eval_batches(text.val, config.batch_size, config.seq_len)
        source = text.source

    with process_group() as ctx, claim_run_folder(out if ctx.is_main else None, RUN_OUTPUTS, resume=args.resume,
                                                  overwrite=args.overwrite):
        result = prosparse(model, train_batches, config, eval_batches, progress=not args.no_progress,
                           checkpoint_dir=checkpoint_dir, resume=args.resume)
        if not ctx.is_main:  # under torchrun the first process writes the outputs
            return 0
        weights, note = save_model(args, model, tokenizer, out, threshold)
        payload = {"model": args.model, "data": source, "output": str(weights), "activation": note,
                   **result.to_dict()}
        write_json_atomic(out / "sparsity.json", payload)
        result.report.plot(out / "sparsity.png", title=f"{args.model} after ProSparse (FATReLU t={threshold:g}): "
                           f"sparsity {result.final_sparsity:.3f}")
    summarize(args, payload, result, out)
    return 0


def save_model(args: argparse.Namespace, model: nn.Module, tokenizer, out: Path, threshold: float) -> tuple[Path, str]:
    """Write the sparsified model to ``out`` in the format it was read; (where it went, how to load it)."""
    if is_model(args.model):
        weights = save_pretrained(model, out) / WEIGHTS_NAME
        return weights, (f"FATReLU(threshold={threshold:g}) recorded in {weights.name}: "
                         f"leanformer.load_pretrained({str(out)!r}, create_model({args.model!r}, ...)) gives the "
                         "sparsified model exactly; create_model(..., checkpoint_path=...) refuses the file")
    with hf_progress_bars(not args.no_progress):
        save_pretrained(model, out)
        if tokenizer is not None:
            write_files_atomic(out, tokenizer.save_pretrained)
    fatrelu = f"relufy(model, ReLUConfig('fatrelu', {threshold}))"
    return out, ("FFN activations recorded in config.json; threshold 0 is ReLU: from_pretrained gives the sparsified "
                 "model as it is" if model.config.leanformer["plain_reload"] else
                 f"FFNs recorded in config.json as {fatrelu}: leanformer.load_pretrained gives the sparsified model "
                 "exactly; a plain from_pretrained refuses it (transformers has no FATReLU)")


def summarize(args: argparse.Namespace, payload: dict, result: ProSparseResult, out: Path) -> None:
    if args.json:
        print(dumps_json({k: v for k, v in payload.items() if k not in ("history", "report")}))
        return
    relu = result.history[-1]  # the last evaluation, after the last step, still with ReLU
    rows = [
        ("model", args.model), ("data", payload["data"]), ("steps", result.config["steps"]),
        ("schedule (end step, lambda)", ", ".join(f"({end}, {lam:g})" for end, lam in result.schedule)),
        ("val loss", f"{result.initial_val_loss:.4f} given -> {relu['val_loss']:.4f} ReLU -> "
                     f"{result.final_val_loss:.4f} FATReLU (perplexity {result.final_perplexity:.2f})"),
        ("sparsity", f"{result.initial_sparsity:.4f} given -> {relu['sparsity']:.4f} ReLU -> "
                     f"{result.final_sparsity:.4f} FATReLU"),
        ("train time", f"{result.seconds:.1f} s"),
        ("model written to", payload["output"]), ("activation", payload["activation"]),
        ("report", f"{out / 'sparsity.json'}, {out / 'sparsity.png'}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))

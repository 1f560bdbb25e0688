"""Does activation compression cost accuracy? Exact vs int8 vs int4 training, several seeds.

Trains the default compact Swin with `leanformer.Trainer` on the embedded digits and on the real
MNIST test set in ../shared/data/mnist (split 8,000/2,000), once per seed and storage variant,
and records the final validation accuracy. Writes benchmarks/results/memory_accuracy.json + .png.

    python benchmarks/memory_accuracy.py                 # digits and MNIST, 3 seeds (about 30 minutes)
    python benchmarks/memory_accuracy.py --tasks mnist   # rerun one task, keep the others' results
    python benchmarks/memory_accuracy.py --quick         # 1 epoch, 1 seed: checks the script works
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from leanformer import CompressionConfig, TrainConfig, Trainer, compress_activations, saved_activation_bytes
from leanformer._io import write_json_atomic

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
VARIANTS = ("none", "int8", "int4")
# (data, epochs, extra config): the make-run default on digits; the same model on 28 px MNIST
TASKS = {"digits": ("digits", 20, {}), "mnist": (str(MNIST), 3, {"img_size": 28})}


def run(task: str, variant: str, seed: int, quick: bool) -> dict:
    data, epochs, extra = TASKS[task]
    config = TrainConfig(data=data, epochs=1 if quick else epochs, seed=seed, **extra)
    compression = CompressionConfig.from_name(variant)
    transforms = [] if compression is None else [lambda model: compress_activations(model, compression)]
    result = Trainer(config, transforms=transforms, settings={"compress": variant},
                     activation_meter=saved_activation_bytes, progress=False).fit()
    return {"seed": seed, "final_val_acc": result.final_val_acc, "best_val_acc": result.best_val_acc,
            "seconds": result.seconds, "saved_activation_ratio": result.saved_activation_ratio}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, variant in enumerate(VARIANTS):
            accs = [100 * r["final_val_acc"] for r in result["tasks"][task][variant]["runs"]]
            ax.bar(i, statistics.mean(accs), color=["#999999", "#2a6fdb", "#8fb3ee"][i], alpha=0.8)
            ax.plot([i] * len(accs), accs, "k.", markersize=6)
        ax.set_xticks(range(len(VARIANTS)), ["exact" if v == "none" else v for v in VARIANTS])
        lows = [100 * r["final_val_acc"] for v in VARIANTS for r in result["tasks"][task][v]["runs"]]
        ax.set_ylim(max(0, min(lows) - 3), min(100, max(lows) + 1.5))
        ax.set_title(f"{task}: final val accuracy (%), dots = seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_tasks(out: Path, quick: bool) -> dict:
    """Results of tasks from an earlier run of the same kind, kept when only some tasks are rerun."""
    path = results_file(out, "memory_accuracy")
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    return earlier.get("tasks", {}) if earlier.get("quick") == quick else {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seeds = range(1 if args.quick else args.seeds)
    result = {"machine": machine_info(), "quick": args.quick, "tasks": _earlier_tasks(args.out, args.quick)}
    for task in args.tasks:
        result["tasks"][task] = {}
        for variant in VARIANTS:
            runs = [run(task, variant, seed, args.quick) for seed in seeds]
            accs = [r["final_val_acc"] for r in runs]
            result["tasks"][task][variant] = {"runs": runs, "mean_final_val_acc": statistics.mean(accs)}
            print(f"{task:<7} {variant:<5} final val acc per seed {[round(a, 4) for a in accs]}")
        exact = result["tasks"][task]["none"]["mean_final_val_acc"]
        for variant in VARIANTS[1:]:
            entry = result["tasks"][task][variant]
            entry["points_vs_exact"] = 100 * (entry["mean_final_val_acc"] - exact)
            print(f"{task:<7} {variant:<5} {entry['points_vs_exact']:+.2f} points vs exact (mean of seeds)")
    path = results_file(args.out, "memory_accuracy")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()

"""The Lazy Neuron Phenomenon on the default compact Swin: how sparse do ReLU FFN activations become?

Li et al. (ICLR 2023) find that after training, the FFN activations of ReLU Transformers are very
sparse (a few % nonzero per token, all layers but the first under 10%) and that keeping only the
k largest per token (Top-k) costs no accuracy. This script repeats both measurements on
`swin_nano_patch2_window4_32` trained with `leanformer.Trainer` on the embedded digits
(the `make run` recipe, fewer epochs):

1. Lazy Neuron curve: the model is relufied (GELU -> ReLU, through the Trainer's `transforms`
   hook) before training; after every epoch (and at initialisation) the per-layer nonzero % of
   the FFN activations on the validation split is measured with `measure_sparsity`.
2. Top-k: the same ReLU model with `apply_topk(k)` (k per token, for every FFN; the hidden widths
   are 192 / 384 / 768 in the three stages), trained the same way, against dense ReLU and the
   original GELU model: final validation accuracy and nonzero %, several seeds.

The per-epoch measurement runs inside the Trainer as an engine callback (`on_epoch_end`, after the
epoch's last step); it runs in eval mode under no_grad and draws no random numbers, so training is
unchanged by it.
Writes benchmarks/results/lazy_neuron.json + lazy_neuron.png.

    OMP_NUM_THREADS=2 python benchmarks/lazy_neuron.py          # 6 variants x 2 seeds x 12 epochs (~10.5 min, 2 cores)
    python benchmarks/lazy_neuron.py --seeds 3 --epochs 20      # the make-run recipe (~20 min)
    python benchmarks/lazy_neuron.py --curve-epochs 60          # + a 60-epoch ReLU run for the curve (+3.5 min)
    python benchmarks/lazy_neuron.py --quick                    # 1 epoch, 1 seed, k=8 only: checks the script works
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from leanformer import TopKConfig, TrainConfig, Trainer, apply_topk, find_ffns, load_data, measure_sparsity, relufy
from leanformer._io import write_json_atomic
from leanformer.engine import Callback

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

DEFAULT_KS = (4, 8, 16, 32)


def variant_names(ks) -> list[str]:
    return ["gelu", "relu", *(f"relu+top{k}" for k in ks)]


def transforms_for(variant: str) -> list:
    """The Trainer transforms that turn the default (GELU) Swin into ``variant``."""
    if variant == "gelu":
        return []
    if variant == "relu":
        return [relufy]
    k = int(variant.removeprefix("relu+top"))
    return [relufy, lambda model: apply_topk(model, TopKConfig(k))]


class EpochSparsity(Callback):
    """A Trainer callback that measures FFN sparsity on fixed batches at the end of every epoch (and, through
    `initial`, the model as built, before its first step)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.reports = []

    def initial(self, model: torch.nn.Module) -> torch.nn.Module:
        """A Trainer transform: measure the model at initialisation, return it unchanged."""
        self.reports.append(measure_sparsity(model, self.batches))
        return model

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> None:
        self.reports.append(measure_sparsity(model, self.batches))


def run(variant: str, seed: int, config: TrainConfig) -> dict:
    config = TrainConfig(**{**config.to_dict(), "seed": seed})
    data = load_data(config.data, img_size=config.img_size, val_fraction=config.val_fraction, seed=seed)
    val_images = data.val.tensors[0]  # the Trainer's validation split (same data spec and seed)
    batches = list(val_images.split(256))
    steps_per_epoch = len(data.train) // config.batch_size  # as the Trainer computes it
    probe = EpochSparsity(batches)
    trainer = Trainer(config, transforms=[*transforms_for(variant), probe.initial], callbacks=[probe],
                      progress=False)
    result = trainer.fit()
    if result.steps != config.epochs * steps_per_epoch or len(probe.reports) != config.epochs + 1:
        raise RuntimeError(f"epoch bookkeeping is off: {result.steps} steps, {len(probe.reports)} measurements "
                           f"for {config.epochs} epochs of {steps_per_epoch} steps")
    reports = probe.reports  # index e = after e epochs
    final = reports[-1]
    history = [{"epoch": 0, "val_acc": None}, *({"epoch": h["epoch"], "val_acc": h["val_acc"],
                                                  "train_loss": h["train_loss"]} for h in result.history)]
    for entry, report in zip(history, reports, strict=True):
        entry["nonzero_percent"] = report.nonzero_percent
        entry["layer_nonzero_percent"] = [100 * (1 - layer.mean_sparsity) for layer in report.layers]
    print(f"  {variant} seed {seed}: val acc {result.final_val_acc:.4f}, nonzero {final.nonzero_percent:.3g}% "
          f"({result.seconds:.0f} s)", flush=True)
    return {"seed": seed, "final_val_acc": result.final_val_acc, "best_val_acc": result.best_val_acc,
            "nonzero_percent": final.nonzero_percent, "seconds": result.seconds, "params": result.params,
            "sparsity": final.to_dict(), "history": history}


def layer_table(config: TrainConfig) -> list[dict]:
    from leanformer import create_model

    data = load_data(config.data, img_size=config.img_size, val_fraction=config.val_fraction, seed=0)
    model = create_model(config.model, in_chans=data.in_chans, num_classes=data.num_classes, img_size=data.img_size)
    return [{"name": ffn.name, "hidden": ffn.hidden_features} for ffn in find_ffns(model)]


def _label(layer: dict) -> str:
    # "layers.1.blocks.0.mlp" -> "stage 2 block 1 (384)"
    parts = layer["name"].split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[2] == "blocks":
        return f"stage {int(parts[1]) + 1} block {int(parts[3]) + 1} ({layer['hidden']} units)"
    return f"{layer['name']} ({layer['hidden']})"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def percent(value, _pos):
        return f"{value:g}"

    def percent_minor(value, _pos):  # label only 2x and 5x between the decades
        return f"{value:g}" if f"{value:.1e}"[0] in "25" else ""

    variants = list(result["variants"])
    layers = result["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1.25, 1, 1]})

    # (a) the Lazy Neuron figure: per-layer nonzero % of the ReLU model over training
    ax = axes[0]
    curve = result.get("curve") or result["variants"]["relu"]["runs"][0]
    history = curve["history"]
    epochs = [h["epoch"] for h in history]
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for i, layer in enumerate(layers):
        ax.plot(epochs, [h["layer_nonzero_percent"][i] for h in history], "o-", markersize=3, color=colors[i],
                label=_label(layer))
    ax.plot(epochs, [h["nonzero_percent"] for h in history], "k--", linewidth=2, label="mean over layers")
    values = [v for h in history for v in h["layer_nonzero_percent"]]
    if max(values) > 10 * min(values):  # log scale only when the curves span more than a decade
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(percent))
        ax.yaxis.set_minor_formatter(FuncFormatter(percent_minor))
        ax.set_ylabel("nonzero FFN activations per token (%, log)")
    else:
        ax.set_ylabel("nonzero FFN activations per token (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = initialisation)")
    ax.set_title(f"ReLU Swin: {len(epochs) - 1} epochs, seed {curve['seed']}, validation split", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3)

    # (b) final validation accuracy per variant, dots = seeds
    ax = axes[1]
    palette = ["#999999", "#2a6fdb"] + ["#e07b39"] * (len(variants) - 2)
    all_accs = []
    for i, name in enumerate(variants):
        accs = [100 * r["final_val_acc"] for r in result["variants"][name]["runs"]]
        all_accs += accs
        ax.bar(i, statistics.mean(accs), color=palette[i], alpha=0.8)
        ax.plot([i] * len(accs), accs, "k.", markersize=6)
    low = max(0, min(all_accs) - 4)
    for i, name in enumerate(variants):
        mean = statistics.mean(100 * r["final_val_acc"] for r in result["variants"][name]["runs"])
        ax.text(i, low + 0.3, f"{mean:.1f}", ha="center", va="bottom", fontsize=8, color="white", weight="bold")
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylim(low, min(100, max(all_accs) + 2))
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title("accuracy (bar = mean, dots = seeds)", fontsize=10)

    # (c) final nonzero % per variant, dots = layers (first seed)
    ax = axes[2]
    for i, name in enumerate(variants):
        runs = result["variants"][name]["runs"]
        mean = statistics.mean(r["nonzero_percent"] for r in runs)
        ax.bar(i, mean, color=palette[i], alpha=0.8)
        per_layer = runs[0]["history"][-1]["layer_nonzero_percent"]
        ax.plot([i] * len(per_layer), per_layer, "k_", markersize=10)
        ax.text(i, mean * 0.85, f"{mean:.3g}", ha="center", va="top", fontsize=8, color="white", weight="bold")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(percent))
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("nonzero FFN activations per token (%, log)")
    ax.set_title("final nonzero % (bar = mean over layers and seeds,\nticks = layers of the first seed)",
                 fontsize=10)
    cfg = result["config"]
    fig.suptitle(f"Lazy Neuron on {cfg['model']} / {cfg['data']}: {cfg['epochs']} epochs, "
                 f"{len(cfg['seeds'])} seed(s){' (QUICK: not a result)' if result['quick'] else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="Top-k values per token")
    parser.add_argument("--curve-epochs", type=int, default=0,
                        help="also train one ReLU model (seed 0) this long for the Lazy Neuron curve "
                             "(0: the curve is the first ReLU run of the comparison)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, k=8: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    epochs, seeds, ks = (1, [0], [8]) if args.quick else (args.epochs, list(range(args.seeds)), args.ks)
    config = TrainConfig(epochs=epochs)
    result = {"machine": machine_info(), "quick": args.quick,
              "config": {**config.to_dict(), "seeds": seeds, "ks": ks}, "layers": layer_table(config),
              "variants": {}}
    started = time.perf_counter()
    for name in variant_names(ks):
        runs = [run(name, seed, config) for seed in seeds]
        accs = [r["final_val_acc"] for r in runs]
        nonzero = [r["nonzero_percent"] for r in runs]
        result["variants"][name] = {
            "runs": runs, "mean_final_val_acc": statistics.mean(accs), "mean_nonzero_percent": statistics.mean(nonzero),
            "mean_layer_nonzero_percent": [statistics.mean(r["history"][-1]["layer_nonzero_percent"][i] for r in runs)
                                           for i in range(len(result["layers"]))]}
        print(f"{name:<11} final val acc {[round(a, 4) for a in accs]}  nonzero % {[round(n, 3) for n in nonzero]}  "
              f"({sum(r['seconds'] for r in runs):.0f} s training)", flush=True)
    if args.curve_epochs and not args.quick:
        print(f"Lazy Neuron curve: ReLU, {args.curve_epochs} epochs", flush=True)
        result["curve"] = run("relu", 0, TrainConfig(epochs=args.curve_epochs))
    relu = result["variants"]["relu"]["mean_final_val_acc"]
    for entry in result["variants"].values():
        entry["points_vs_relu"] = 100 * (entry["mean_final_val_acc"] - relu)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = results_file(args.out, "lazy_neuron")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()

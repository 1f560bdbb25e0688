"""ProSparse at small scale: a byte-level LLaMA on Tiny Shakespeare, made sparse three ways.

1. "original": a `LlamaForCausalLM` (SiLU-gated FFN) built from `LlamaConfig` and trained on the first 90% of
   ../shared/data/tinyshakespeare/input.txt (bytes = characters) until its validation loss flattens.
2. From that checkpoint, the same number of extra steps for each of
   (a) "relu": ReLU substitution only (ProSparse step 1 for the whole run, plain ReLU at the end);
   (b) "prosparse": ReLU, then the progressive λ stages (the paper's 7B table scaled to the run, λ times
       --lambda-scale), then FATReLU(--threshold);
   (c) "constant xF": ReLU, then one constant λ = F x ProSparse's final peak from the same step, then FATReLU;
       several F, so that ProSparse can be compared with constant λ *at the same sparsity* (interpolated on
       the constant-λ frontier of the same seed).
   Every variant runs once per seed (the seed sets the order of the extra training data).
3. A FATReLU threshold sweep on the ProSparse model (the paper's Table 9 at this scale).

Validation is the held-out last 10% of the file, every prediction once. Sparsity is ProSparse's: the mean
over layers of the fraction of zeros in the FFN intermediate output. Writes
benchmarks/results/prosparse_lm.json + .png.

    python benchmarks/prosparse_lm.py            # about 40 minutes on 2 CPU cores
    python benchmarks/prosparse_lm.py --quick    # a tiny run: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from leanformer._io import write_json_atomic
from leanformer.data.text import lm_batches, lm_eval_batches, load_text
from leanformer.engine.optim import build_optimizer, lr_at, set_lr
from leanformer.sparsity import ReLUConfig, measure_sparsity, relufy
from leanformer.sparsity.prosparse_training import ProSparseConfig, causal_lm_loss, prosparse
from leanformer.sparsity.regularize import PROSPARSE_7B, ProSparseSchedule

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
THRESHOLDS = (0.0, 0.005, 0.01, 0.02, 0.05)


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq_len, hidden_act="silu", tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def evaluate(model, batches) -> dict:
    """Validation loss over every target of ``batches``, perplexity, and FFN sparsity on their inputs."""
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for inputs, targets in batches:
            total += float(causal_lm_loss(model, (inputs, targets))) * targets.numel()
            count += targets.numel()
    loss = total / count
    report = measure_sparsity(model, [inputs for inputs, _ in batches])
    return {"val_loss": loss, "perplexity": math.exp(loss), "sparsity": report.average_sparsity,
            "per_layer": [layer.mean_sparsity for layer in report.layers]}


def pretrain(model, split, args, eval_batches) -> list[dict]:
    """The original model: AdamW, warmup + cosine, evaluated every --eval-every steps."""
    optimizer = build_optimizer(model, args.lr, 0.1)
    batches = lm_batches(split.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(1))
    history = []
    model.train()
    for step in range(args.pretrain_steps):
        set_lr(optimizer, lr_at(step, args.pretrain_steps, args.pretrain_steps // 20, args.lr, args.lr / 10))
        loss = causal_lm_loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.pretrain_steps:
            history.append({"step": step + 1, "train_loss": loss.item(), **evaluate(model, eval_batches)})
            print(f"pretrain {step + 1}: val loss {history[-1]['val_loss']:.4f}", flush=True)
            model.train()
    return history


def variant_configs(args, seed: int) -> dict[str, ProSparseConfig]:
    """(a) ReLU only, (b) ProSparse, (c) one constant λ per entry of --constant-fractions (of ProSparse's peak)."""
    common = dict(steps=args.steps, relu_steps=args.relu_steps, lr=args.lr / 3, min_lr=args.lr / 30,
                  warmup_steps=0, weight_decay=0.1, batch_size=args.batch_size, seq_len=args.seq_len,
                  eval_every=args.eval_every, seed=seed)
    left = args.steps - args.relu_steps
    paper = tuple((end - PROSPARSE_7B[0][0], lam * args.lambda_scale) for end, lam in PROSPARSE_7B[1:])
    stages = ProSparseSchedule(paper).scaled(left).stages
    peak = stages[-1][1]
    configs = {"relu": ProSparseConfig(**common, stages=((left, 0.0),), threshold=0.0),
               "prosparse": ProSparseConfig(**common, stages=stages, threshold=args.threshold)}
    for fraction in args.constant_fractions:
        configs[f"constant x{fraction:g}"] = ProSparseConfig(**common, stages=((left, peak * fraction),),
                                                             threshold=args.threshold)
    return configs


def interpolate_at(sparsity: float, frontier: list[tuple[float, float]]) -> float | None:
    """Perplexity of the constant-λ frontier (sparsity, perplexity) at ``sparsity``; None outside its range."""
    frontier = sorted(frontier)
    for (s0, p0), (s1, p1) in zip(frontier, frontier[1:], strict=False):
        if s0 <= sparsity <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (sparsity - s0) / (s1 - s0)
    return None


def matched_comparison(variants: dict, seeds: list[int]) -> dict:
    """ProSparse against constant λ at ProSparse's own sparsity, per seed (the frontier of that seed's constants)."""
    constants = [name for name in variants if name.startswith("constant")]
    rows = []
    for seed in seeds:
        ours = variants["prosparse"]["seeds"][str(seed)]
        frontier = [(variants[name]["seeds"][str(seed)]["sparsity"], variants[name]["seeds"][str(seed)]["perplexity"])
                    for name in constants]
        at_same = interpolate_at(ours["sparsity"], frontier)
        rows.append({"seed": seed, "prosparse_sparsity": ours["sparsity"], "prosparse_perplexity": ours["perplexity"],
                     "constant_perplexity_at_same_sparsity": at_same,
                     "ratio": None if at_same is None else ours["perplexity"] / at_same})
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {"per_seed": rows, "ratio_mean": statistics.mean(ratios) if ratios else None,
            "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else None, "seeds_in_range": len(ratios)}


def summarise(runs: dict[str, dict]) -> dict:
    """Mean and standard deviation over seeds of the final figures of one variant."""
    out = {"seeds": runs}
    for key in ("sparsity", "perplexity", "perplexity_vs_original"):
        values = [run[key] for run in runs.values()]
        out[key] = statistics.mean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    colors = {"relu": "#999999", "prosparse": "#2a6fdb"}
    constants = [name for name in result["variants"] if name.startswith("constant")]
    shades = plt.cm.Oranges([0.4 + 0.5 * i / max(1, len(constants) - 1) for i in range(len(constants))])
    colors.update(zip(constants, shades, strict=True))
    offset = result["pretrain"][-1]["step"]
    first = str(result["args"]["seeds"][0])
    for name, variant in result["variants"].items():
        history = variant["seeds"][first]["history"]
        steps = [offset + h["step"] for h in history]
        axes[0].plot(steps, [100 * h["sparsity"] for h in history], label=name, color=colors[name])
        axes[1].plot(steps, [math.exp(h["val_loss"]) for h in history], label=name, color=colors[name])
    axes[1].plot([h["step"] for h in result["pretrain"]], [h["perplexity"] for h in result["pretrain"]],
                 label="original (SiLU)", color="k")
    axes[0].set(title=f"FFN sparsity during training (%), seed {first}", xlabel="step")
    axes[1].set(title=f"validation perplexity (fixed slice), seed {first}", xlabel="step", yscale="log")
    frontier = sorted((100 * result["variants"][n]["sparsity"], result["variants"][n]["perplexity"]) for n in constants)
    axes[2].plot(*zip(*frontier, strict=True), "-", color="#d9822b", lw=1, label="constant λ (mean over seeds)")
    for name, variant in result["variants"].items():
        points = list(variant["seeds"].values())
        axes[2].scatter([100 * p["sparsity"] for p in points], [p["perplexity"] for p in points], s=14,
                        color=colors[name], label=name)
    original = result["original"]
    axes[2].axhline(original["perplexity"], ls=":", color="k", lw=0.8, label="original")
    axes[2].axhline(original["perplexity"] * 1.03, ls="--", color="k", lw=0.8, label="original + 3%")
    axes[2].set(title="final sparsity vs perplexity (every seed)", xlabel="sparsity (%)", ylabel="perplexity")
    sweep = result["threshold_sweep"]
    axes[3].plot([100 * s["sparsity"] for s in sweep], [s["perplexity"] for s in sweep], "o-",
                 color=colors["prosparse"])
    for s in sweep:
        axes[3].annotate(f"t={s['threshold']:g}", (100 * s["sparsity"], s["perplexity"]), fontsize=8)
    axes[3].set(title=f"FATReLU threshold sweep (ProSparse, seed {first})", xlabel="sparsity (%)",
                ylabel="perplexity")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"ProSparse, byte-level LLaMA on Tiny Shakespeare — {m['cpu']}, {m['torch_threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=1000, help="extra steps of each variant")
    parser.add_argument("--relu-steps", type=int, default=200, help="ReLU-only steps at the start of each variant")
    parser.add_argument("--lambda-scale", type=float, default=5.0,
                        help="multiplies the paper's λ table (our L1 term is a mean over tokens and units)")
    parser.add_argument("--constant-fractions", type=_floats, default=[0.1, 0.25, 0.5, 1.0],
                        help="constant-λ arms, as fractions of ProSparse's final peak (comma-separated)")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                        help="seeds of the extra training (data order); the original is trained once")
    parser.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold (the paper's 0.01)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.layers, args.seq_len, args.batch_size = 32, 64, 2, 32, 4
        args.pretrain_steps, args.steps, args.relu_steps, args.eval_every = 20, 30, 6, 10
        args.seeds, args.constant_fractions = [0, 1], [0.5, 1.0]
    split = load_text(TEXT, val_fraction=0.1, seq_len=args.seq_len)
    progress_batches = lm_eval_batches(split.val[: 20 * args.seq_len * args.batch_size], args.batch_size,
                                       args.seq_len)  # a fixed slice for the curves
    full_batches = lm_eval_batches(split.val if not args.quick else split.val[:4000], args.batch_size, args.seq_len)
    started = time.perf_counter()
    model = build_model(args)
    result = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"},
              "pretrain": pretrain(model, split, args, progress_batches)}
    result["original"] = evaluate(model, full_batches)
    print(f"original: {result['original']}", flush=True)
    runs: dict[str, dict] = {}
    for seed in args.seeds:
        for name, config in variant_configs(args, seed).items():
            candidate = copy.deepcopy(model)
            batches = lm_batches(split.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(100 + seed))
            run = prosparse(candidate, batches, config, progress_batches, progress=False)
            final = evaluate(candidate, full_batches)
            final["perplexity_vs_original"] = final["perplexity"] / result["original"]["perplexity"]
            runs.setdefault(name, {})[str(seed)] = {"lambda_peak": config.stages[-1][1], "history": run.history,
                                                    **final}
            print(f"seed {seed} {name:<16} sparsity {100 * final['sparsity']:.2f}%  perplexity "
                  f"{final['perplexity']:.4f} ({final['perplexity_vs_original']:.4f}x original)", flush=True)
            if name == "prosparse" and seed == args.seeds[0]:
                sweep = []
                for threshold in THRESHOLDS:
                    relufy(candidate, ReLUConfig("fatrelu", threshold))
                    sweep.append({"threshold": threshold, **evaluate(candidate, full_batches)})
                    print(f"  FATReLU t={threshold:<6g} sparsity {100 * sweep[-1]['sparsity']:.2f}%  "
                          f"perplexity {sweep[-1]['perplexity']:.4f}", flush=True)
                result["threshold_sweep"] = sweep
    result["variants"] = {name: summarise(by_seed) for name, by_seed in runs.items()}
    result["matched"] = matched_comparison(result["variants"], args.seeds)
    print(f"ProSparse perplexity / constant-λ perplexity at the same sparsity: {result['matched']}", flush=True)
    result["seconds"] = time.perf_counter() - started
    path = results_file(args.out, "prosparse_lm")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()

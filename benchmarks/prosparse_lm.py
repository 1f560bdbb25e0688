"""ProSparse at small scale: a byte-level LLaMA on Tiny Shakespeare, made sparse three ways.

1. "original": a `LlamaForCausalLM` (SiLU-gated FFN) built from `LlamaConfig` and trained on the first 90% of
   ../shared/data/tinyshakespeare/input.txt (bytes = characters) until its validation loss flattens.
2. From that checkpoint, the same number of extra steps for each of
   (a) "relu": ReLU substitution only (ProSparse step 1 for the whole run, plain ReLU at the end);
   (b) "prosparse": ReLU, then the progressive λ stages (the paper's 7B table scaled to the run, λ times
       --lambda-scale), then FATReLU(--threshold);
   (c) "constant": ReLU, then one constant λ equal to ProSparse's final peak from the same step, then FATReLU.
3. A FATReLU threshold sweep on the ProSparse model (the paper's Table 9 at this scale).

Validation is the held-out last 10% of the file, every prediction once. Sparsity is ProSparse's: the mean
over layers of the fraction of zeros in the FFN intermediate output. Writes
benchmarks/results/prosparse_lm.json + .png.

    python benchmarks/prosparse_lm.py            # about 25 minutes on 2 CPU cores
    python benchmarks/prosparse_lm.py --quick    # a tiny run: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from leanformer._io import write_json_atomic
from leanformer.data.text import lm_batches, lm_eval_batches, load_text
from leanformer.sparsity import measure_sparsity, relufy
from leanformer.sparsity.prosparse import ProSparseConfig, causal_lm_loss, prosparse
from leanformer.sparsity.regularize import PROSPARSE_7B, ProSparseSchedule
from leanformer.train.optim import build_optimizer, lr_at, set_lr

try:
    from benchmarks._common import RESULTS, machine_info
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info

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


def variant_configs(args) -> dict[str, ProSparseConfig]:
    common = dict(steps=args.steps, relu_steps=args.relu_steps, lr=args.lr / 3, min_lr=args.lr / 30,
                  warmup_steps=0, weight_decay=0.1, batch_size=args.batch_size, seq_len=args.seq_len,
                  eval_every=args.eval_every, seed=1)
    left = args.steps - args.relu_steps
    paper = tuple((end - PROSPARSE_7B[0][0], lam * args.lambda_scale) for end, lam in PROSPARSE_7B[1:])
    stages = ProSparseSchedule(paper).scaled(left).stages
    peak = stages[-1][1]
    return {"relu": ProSparseConfig(**common, stages=((left, 0.0),), threshold=0.0),
            "prosparse": ProSparseConfig(**common, stages=stages, threshold=args.threshold),
            "constant": ProSparseConfig(**common, stages=((left, peak),), threshold=args.threshold)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    colors = {"relu": "#999999", "prosparse": "#2a6fdb", "constant": "#d9822b"}
    offset = result["pretrain"][-1]["step"]
    for name, run in result["variants"].items():
        steps = [offset + h["step"] for h in run["history"]]
        axes[0].plot(steps, [100 * h["sparsity"] for h in run["history"]], label=name, color=colors[name])
        axes[1].plot(steps, [math.exp(h["val_loss"]) for h in run["history"]], label=name, color=colors[name])
    axes[1].plot([h["step"] for h in result["pretrain"]], [h["perplexity"] for h in result["pretrain"]],
                 label="original (SiLU)", color="k")
    axes[0].set(title="FFN sparsity during training (%)", xlabel="step")
    axes[1].set(title="validation perplexity", xlabel="step", yscale="log")
    sweep = result["threshold_sweep"]
    axes[2].plot([100 * s["sparsity"] for s in sweep], [s["perplexity"] for s in sweep], "o-",
                 color=colors["prosparse"])
    for s in sweep:
        axes[2].annotate(f"t={s['threshold']:g}", (100 * s["sparsity"], s["perplexity"]), fontsize=8)
    original = result["original"]
    axes[2].axhline(original["perplexity"] * 1.03, ls="--", color="k", lw=0.8, label="original + 3%")
    axes[2].set(title="FATReLU threshold sweep (ProSparse)", xlabel="sparsity (%)", ylabel="perplexity")
    for ax in axes:
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"ProSparse, byte-level LLaMA on Tiny Shakespeare — {m['cpu']}, {m['torch_threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=1000, help="extra steps of each variant")
    parser.add_argument("--relu-steps", type=int, default=200, help="ReLU-only steps at the start of each variant")
    parser.add_argument("--lambda-scale", type=float, default=5.0,
                        help="multiplies the paper's λ table (our L1 term is a mean over tokens and units)")
    parser.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold (the paper's 0.01)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.layers, args.seq_len, args.batch_size = 32, 64, 2, 32, 4
        args.pretrain_steps, args.steps, args.relu_steps, args.eval_every = 20, 30, 6, 10
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
    result["variants"] = {}
    for name, config in variant_configs(args).items():
        candidate = copy.deepcopy(model)
        batches = lm_batches(split.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(2))
        run = prosparse(candidate, batches, config, progress_batches, progress=False)
        final = evaluate(candidate, full_batches)
        result["variants"][name] = {"config": config.to_dict(), "schedule": run.schedule, "history": run.history,
                                    **final, "perplexity_vs_original": final["perplexity"] /
                                    result["original"]["perplexity"]}
        print(f"{name:<10} sparsity {100 * final['sparsity']:.2f}%  perplexity {final['perplexity']:.4f} "
              f"({final['perplexity'] / result['original']['perplexity']:.4f}x original)", flush=True)
        if name == "prosparse":
            sweep = []
            for threshold in THRESHOLDS:
                relufy(candidate, "fatrelu", threshold)
                sweep.append({"threshold": threshold, **evaluate(candidate, full_batches)})
                print(f"  FATReLU t={threshold:<6g} sparsity {100 * sweep[-1]['sparsity']:.2f}%  "
                      f"perplexity {sweep[-1]['perplexity']:.4f}", flush=True)
            result["threshold_sweep"] = sweep
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(args.out / "prosparse_lm.json", result)
    plot(result, args.out / "prosparse_lm.png")
    return result


if __name__ == "__main__":
    main()

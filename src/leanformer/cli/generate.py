"""`leanformer generate`: greedy decoding with sparse FFN inference, timed, optionally against the dense model."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .._hf import check_vocab
from .._io import dumps_json
from ..data import decode_tokens, encode_text
from ..sparsity import (
    PREDICTORS_FILE,
    DecodeConfig,
    Predictors,
    SparseInferenceConfig,
    fast_decoder,
    inference_report,
    load_sparsified_lm,
    sparse_kernel_backend,
    sparsify_for_inference,
)
from ._causal_lm import add_model_options, model_folder, reading_model
from ._options import check_positive

SPARSE_MODES = ("exact", "predictor", "off")
ENGINES = ("auto", "compiled", "hf")

DESCRIPTION = (
    "Greedy decoding (model.generate, do_sample=False) with a Hugging Face causal LM folder whose FFN activation is "
    "ReLU or FATReLU, such as `leanformer sparsify` writes, its FFNs swapped for sparse ones that skip the hidden "
    "units the activation leaves at zero. --sparse exact computes the gate densely and only the active rows of up "
    "and down: the tokens are the dense model's. --sparse predictor lets the low-rank predictors trained by "
    "`leanformer predictors` choose the units of gate, up and down: faster, approximate (the prompt's first "
    "token, the attention sink, is computed densely). --sparse off decodes "
    "densely. The FATReLU threshold recorded in DIR/sparsity.json is applied, so the model is exactly the "
    "sparsified one. The prompt is encoded as sparsify and predictors encode their text: the folder's tokenizer "
    "without special tokens, or UTF-8 bytes when the folder has none. Prints the text, tokens/s (new tokens over "
    "the wall time of generate, prompt included, after a warm-up forward) and which FFN paths ran (calls per path: "
    "sparse-{native,triton,torch}, dense; mean share of hidden units computed); --compare also decodes with the "
    "dense model and reports its tokens/s, the speedup and whether the tokens are identical. --engine compiled "
    "decodes LLaMA-family models (LLaMA/SmolLM, Mistral, Qwen2/3, Gemma) with leanformer's compiled decoder instead "
    "of model.generate: every weight streamed once per token, the zero units of ReLU/FATReLU FFNs and the inputs "
    "zeroed by TEAL/CATS thresholds (`leanformer thresholds`) skipped, same tokens; with --sparse predictor it reads "
    "only the gate rows of the predicted units (each prompt token predicted on its own, where model.generate "
    "predicts the prompt's units together); auto (default) uses it for --sparse exact and predictor whenever the "
    "model is one of those, and says so when it cannot."
)


class _TokenBar:
    """A tqdm bar over new tokens, fed by generate's streamer protocol (put: the prompt first, then each token)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="token", leave=False, disable=not enabled, file=sys.stderr)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="greedy decoding with sparse FFN inference (exact or predictor), timed",
                       description=DESCRIPTION)
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate; fewer if the model emits its end-of-sequence token, and at most what "
                   "the model's context (max_position_embeddings) leaves after the prompt: a larger value is capped "
                   "there, with a notice (default: %(default)s)")
    p.add_argument("--sparse", choices=SPARSE_MODES, default="exact",
                   help="FFN inference: exact (same tokens as dense), predictor (needs --predictors) or off (dense) "
                   "(default: %(default)s)")
    p.add_argument("--predictors", type=Path, default=None,
                   help=f"predictors for --sparse predictor: a file, or a folder holding {PREDICTORS_FILE} "
                   "(default: DIR, where `leanformer predictors` writes them)")
    p.add_argument("--max-active", default="auto",
                   help="largest share of hidden units a call may compute sparsely before it runs dense: 'auto' "
                   "measures the crossover per FFN shape on this machine (about a second per shape), or a fraction "
                   "in [0, 1] (default: %(default)s)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="compiled (leanformer's decoder), hf (model.generate with sparse FFN modules) or auto: "
                   "compiled for --sparse exact when the model allows it (default: %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="also decode with the dense model: its tokens/s, the speedup, identical tokens")
    p.add_argument("--no-progress", action="store_true", help="no loading or decoding progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text and a table")
    p.set_defaults(run=run)


def parse_max_active(text: str) -> float | str:
    """'auto' or a fraction in [0, 1], as sparsify_for_inference takes it."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--max-active {text!r}: expected 'auto' or a fraction in [0, 1]")
    return value


def path_summary(model: nn.Module) -> dict:
    """Calls per path summed over the sparse FFNs, their mean share of units computed, and the per-layer report."""
    layers = inference_report(model)
    calls: Counter = Counter()
    for layer in layers.values():
        calls.update(layer["calls"])
    fractions = [layer["computed_fraction"] for layer in layers.values() if layer["computed_fraction"] is not None]
    return {"calls": dict(sorted(calls.items())),
            "computed_fraction": sum(fractions) / len(fractions) if fractions else None, "layers": layers}


def cap_new_tokens(requested: int, prompt_tokens: int, config) -> int:
    """``requested`` new tokens, or fewer so that prompt and continuation fit the model's context
    (``max_position_embeddings``; no cap for a model without one), with a notice on stderr when capped: past its
    context a model has no positions for the tokens, and decoding would fail after the work or run on garbage."""
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int) or isinstance(context, bool):
        return requested
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"--prompt encodes to {prompt_tokens} tokens, but the model's context holds "
                         f"{context} (max_position_embeddings): expected a shorter prompt")
    if requested > room:
        print(f"leanformer generate: note: --max-new-tokens {requested} capped at {room}: the model's context holds "
              f"{context} tokens (max_position_embeddings) and the prompt takes {prompt_tokens}", file=sys.stderr)
        return room
    return requested


def decode(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, desc: str, progress: bool) -> dict:
    """Greedy decoding of one prompt, timed: the new token ids, their count, seconds and tokens/s."""
    ids = prompt[None]
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         streamer=_TokenBar(max_new_tokens, desc, progress))
    seconds = time.perf_counter() - start
    new = out[0, len(prompt):]
    return {"tokens": new, "new_tokens": len(new), "seconds": seconds, "tokens_per_s": len(new) / seconds}


def compiled_decoder(args: argparse.Namespace, model: nn.Module, max_len: int, predictors: Predictors | None):
    """(the compiled decoder for this run, or None for model.generate; why not, for --engine auto, else None)."""
    if args.engine == "hf" or args.sparse == "off":
        return None, None
    try:
        return fast_decoder(model, DecodeConfig(max_len=max_len), predictors), None
    except (ValueError, RuntimeError) as err:
        if args.engine == "compiled":
            raise ValueError(f"--engine compiled: {err}") from err
        return None, str(err)


def decode_compiled(decoder, prompt: torch.Tensor, max_new_tokens: int, progress: bool) -> dict:
    """`decode` with the compiled decoder (stops at the model's end-of-sequence token, as generate does)."""
    bar = _TokenBar(max_new_tokens, "decode", progress)
    bar.put(prompt)
    start = time.perf_counter()
    new = decoder.generate(prompt, max_new_tokens, streamer=bar)
    seconds = time.perf_counter() - start
    bar.end()
    return {"tokens": new, "new_tokens": len(new), "seconds": seconds, "tokens_per_s": len(new) / seconds}


def run(args: argparse.Namespace) -> int:
    check_positive(("--max-new-tokens", args.max_new_tokens))
    max_active = parse_max_active(args.max_active)
    if args.compare and args.sparse == "off":
        raise ValueError("--compare compares sparse with dense decoding: it needs --sparse exact or predictor")
    if args.engine == "compiled" and args.sparse == "off":
        raise ValueError("--engine compiled decodes sparsely (--sparse exact or predictor), not --sparse off: "
                         "use --engine hf")
    if args.predictors is not None and args.sparse != "predictor":
        raise ValueError(f"--predictors is used by --sparse predictor only (--sparse is {args.sparse})")
    progress = not args.no_progress
    predictors = None
    model_folder(args)  # the folder first (a GGUF file converted): it also decides where predictors are looked for
    if args.sparse == "predictor":
        path = args.predictors or args.model
        path = path / PREDICTORS_FILE if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--predictors {path}: no such file; train predictors for this model first with "
                             f"`leanformer predictors --model {args.model} --data TEXTFILE`")
        predictors = Predictors.load(path)
    with reading_model():
        lm = load_sparsified_lm(args.model, args.threshold, progress, threshold_name="--threshold")
    prompt = encode_text(args.prompt, lm.tokenizer)
    if len(prompt) == 0:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens: expected some text to continue")
    check_vocab(lm.model, args.model, [prompt], "--prompt")
    max_new_tokens = cap_new_tokens(args.max_new_tokens, len(prompt), lm.model.config)
    with torch.no_grad():
        lm.model(prompt[None])  # warm-up: first-call allocations and kernel selection stay out of the timings
    dense, model = lm.model, lm.model
    decoder, not_compiled = compiled_decoder(args, dense, len(prompt) + max_new_tokens, predictors)
    if decoder is not None:
        result = decode_compiled(decoder, prompt, max_new_tokens, progress)
        paths = {"engine": "compiled", "computed_fraction": decoder.timings()["computed_fraction"]}
    else:
        if args.sparse != "off":
            model = sparsify_for_inference(copy.deepcopy(dense) if args.compare else dense,
                                           SparseInferenceConfig(args.sparse, max_active=max_active), predictors)
            # loads (or builds) the compiled kernels now, not while timed
            sparse_kernel_backend(next(model.parameters()).detach())
        result = decode(model, prompt, max_new_tokens, "decode", progress)
        paths = None if args.sparse == "off" else {"engine": "hf", **path_summary(model)}
    payload = {"model": str(args.model), "activation": lm.activation, "sparse": args.sparse,
               "engine": "compiled" if decoder is not None else "hf", "engine_note": not_compiled,
               "max_active": None if args.sparse == "off" or decoder is not None else max_active,
               "prompt": args.prompt,
               "prompt_tokens": len(prompt), "max_new_tokens": max_new_tokens,
               "text": decode_tokens(torch.cat([prompt, result["tokens"]]), lm.tokenizer),
               **{k: v for k, v in result.items() if k != "tokens"}, "token_ids": result["tokens"].tolist(),
               "paths": paths}
    if args.compare:
        reference = decode(dense, prompt, max_new_tokens, "dense", progress)
        payload["dense"] = {"new_tokens": reference["new_tokens"], "seconds": reference["seconds"],
                            "tokens_per_s": reference["tokens_per_s"]}
        payload["speedup"] = payload["tokens_per_s"] / reference["tokens_per_s"]
        payload["identical_tokens"] = torch.equal(result["tokens"], reference["tokens"])
    summarize(args, payload)
    return 0


def summarize(args: argparse.Namespace, payload: dict) -> None:
    if args.json:
        print(dumps_json(payload))
        return
    mode = payload["sparse"] + ("" if payload["max_active"] is None else f" (max_active {payload['max_active']})")
    rows = [("model", payload["model"]), ("activation", payload["activation"]), ("sparse", mode),
            ("decoding", f"{payload['new_tokens']} new tokens in {payload['seconds']:.3f} s: "
                         f"{payload['tokens_per_s']:.1f} tokens/s")]
    paths = payload["paths"]
    rows.append(("engine", payload["engine"] + (f" (the compiled decoder cannot: {payload['engine_note']})"
                                                if payload["engine_note"] else "")))
    if paths is not None and paths["engine"] == "compiled":
        rows.append(("computed", f"{100 * paths['computed_fraction']:.1f}% of the sparse products' inputs/units"))
    elif paths is not None:
        calls = ", ".join(f"{path} {count}" for path, count in paths["calls"].items())
        computed = "-" if paths["computed_fraction"] is None else f"{100 * paths['computed_fraction']:.1f}%"
        rows.append(("FFN paths", f"{calls} calls; {computed} of hidden units computed (mean over "
                                  f"{len(paths['layers'])} FFNs)"))
    if "dense" in payload:
        rows.append(("dense", f"{payload['dense']['tokens_per_s']:.1f} tokens/s; speedup {payload['speedup']:.2f}x; "
                              f"identical tokens: {'yes' if payload['identical_tokens'] else 'no'}"))
    width = max(len(k) for k, _ in rows)
    print(payload["text"])
    print()
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))

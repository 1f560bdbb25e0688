"""Batch-1 greedy decoding of LLaMA-family causal LMs at the memory-bandwidth limit, dense or activation-sparse.

Decoding one token reads every weight once for one multiply-add, so its cost is the weights' bytes over the
memory bandwidth. Hugging Face's eager forward reaches about a third of that on a 2-core CPU (PyTorch's fp32
matrix-vector product, plus ~400 small ops per token); llama.cpp reaches most of it. `fast_decoder` hands the
model's weights to a compiled decoder (csrc/decode.cpp) that runs one whole token per call: its own matrix-vector
products that stream each weight once, a static KV cache, no allocation per token. Logits equal the model's up
to fp32 rounding (the products sum in another order), so greedy decoding gives the same tokens.

The same decoder skips work that activation sparsity makes unnecessary: with per-layer input thresholds (TEAL,
Liu et al. 2025: inputs of a Linear with |x| <= t are treated as zero) it reads only the weight rows of the
surviving inputs; with FFN thresholds (CATS, Lee et al. 2024: units with |act(gate x)| <= t are zero) it computes
up and down for the surviving units only. Either way the result is the thresholded model's, exactly
(`sparsity.thresholds` calibrates the thresholds and applies them to the PyTorch model, the reference). A
ReLU-family FFN (ProSparse) skips its zero units exactly; given Deja Vu-style predictors (Liu et al. 2023) it
computes the gate only for the units they predict active, as `sparsify_for_inference` does in predictor mode.

Supported: the `LLAMA_FAMILY` model types (LLaMA/SmolLM, Mistral, Qwen2, Qwen3, Gemma); fp32 weights on the CPU.
Weight layout ("rows": out x in, or "cols": in x out, which input sparsity needs) is chosen per machine by
measurement unless the config fixes it (see `tune.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._native import kernels as native_kernels
from .predictor import LowRankPredictor, Predictors
from .thresholds import InputSparseLinear, is_thresholded

DECODE_SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"  # the compiled decoder

__all__ = ["LLAMA_FAMILY", "DecodeConfig", "FastDecoder", "fast_decoder"]

LAYOUTS = ("auto", "rows", "cols")


@dataclass(frozen=True)
class _Family:
    """What sets a model type apart from LLaMA: RMSNorm computing x * (1 + w), biases on q/k/v, per-head q/k norms."""

    norm_plus_one: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False


LLAMA_FAMILY = {
    "llama": _Family(),
    "mistral": _Family(),
    "qwen2": _Family(qkv_bias=True),
    "qwen3": _Family(qk_norm=True),
    "gemma": _Family(norm_plus_one=True),
}
_SILU, _GELU_TANH, _FATRELU = 0, 1, 2  # the kernel's activation codes


@dataclass(frozen=True)
class DecodeConfig:
    """How `fast_decoder` lays out and sparsifies the model.

    max_len: positions the KV cache holds (prompt + new tokens); at most the model's max_position_embeddings.
    layout: weight layout of the dense layer projections, "rows", "cols" or "auto" (measured on this machine, see
        `tune.py`); projections with an input threshold (TEAL) are always "cols"; with an FFN threshold (CATS)
        up is "rows" and down "cols".
    exact_prefix: with predictors, the first positions of a sequence whose FFNs are computed exactly instead of
        predicted. The first token carries the few massive activations (thousands, in a handful of units of a
        few layers) that make it the attention sink every later token reads; a predictor that misses one of
        them ruins every later token (`benchmarks/prosparse_smollm2.py` measures it), for the cost of one dense
        token.
    """

    max_len: int = 2048
    layout: str = "auto"
    exact_prefix: int = 1

    def __post_init__(self):
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"DecodeConfig.max_len={self.max_len!r}: expected a positive integer")
        if isinstance(self.exact_prefix, bool) or not isinstance(self.exact_prefix, int) or self.exact_prefix < 0:
            raise ValueError(f"DecodeConfig.exact_prefix={self.exact_prefix!r}: expected an integer >= 0")
        if self.layout not in LAYOUTS:
            raise ValueError(f"DecodeConfig.layout={self.layout!r}: expected one of {', '.join(LAYOUTS)}")


def _family(model: nn.Module) -> _Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY or not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"fast_decoder: {type(model).__name__} (model_type {model_type!r}) is not supported: "
                         f"expected a Hugging Face causal LM of type {', '.join(LLAMA_FAMILY)}")
    return LLAMA_FAMILY[model_type]


def _activation(index: int, act: nn.Module) -> tuple[int, float]:
    """(kernel code, FATReLU threshold) of a layer's FFN activation, identified by what it computes (a relufied
    model keeps a SiLU config): SiLU, GELU-tanh, or ReLU/FATReLU; anything else (Top-k, GELU-erf) is refused."""
    x = torch.linspace(-6, 6, 241)
    with torch.no_grad():
        y = act(x)
    candidates = {_SILU: F.silu(x), _GELU_TANH: F.gelu(x, approximate="tanh")}
    for code, expected in candidates.items():
        if torch.allclose(y, expected, rtol=1e-5, atol=1e-6):
            return code, 0.0
    threshold = float(getattr(act, "threshold", 0.0))
    if torch.equal(y, torch.where(x < threshold, torch.zeros_like(x), x)):
        return _FATRELU, threshold
    described = " ".join(repr(act).split())[:80]
    raise ValueError(f"fast_decoder: layer {index}: FFN activation {described} is not supported: expected SiLU, "
                     "GELU (tanh), ReLU or FATReLU, optionally with a CATS threshold (calibrate_thresholds)")


def _own_activation(act: nn.Module) -> nn.Module:
    return act[0] if is_thresholded(act) else act


def _input_threshold(layer: int, linears: tuple[nn.Linear, ...], what: str) -> float | None:
    """The TEAL threshold the Linears reading one input share (None: dense); they must agree."""
    found = {m.threshold if isinstance(m, InputSparseLinear) else None for m in linears}
    if len(found) > 1:
        raise ValueError(f"fast_decoder: layer {layer}: the {what} projections read one input but have different "
                         f"input thresholds {sorted(found, key=str)}: expected one (calibrate_thresholds sets one)")
    return found.pop()


def _layer_thresholds(index: int, layer: nn.Module) -> tuple[dict[str, float], float | None]:
    """(TEAL thresholds by part: qkv, o, gate_up, down; the CATS threshold or None) set on a decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    parts = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "o": (attn.o_proj,),
             "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}
    teal = {part: _input_threshold(index, linears, part) for part, linears in parts.items()}
    cats = mlp.act_fn[1].threshold if is_thresholded(mlp.act_fn) else None
    if cats is not None and (teal["gate_up"] is not None or teal["down"] is not None):
        raise ValueError(f"fast_decoder: layer {index} has both TEAL FFN input thresholds and a CATS threshold")
    return {part: t for part, t in teal.items() if t is not None}, cats


def _layer_predictor(index: int, predictors: Predictors | None, act: int, cats: float | None,
                     teal: dict) -> LowRankPredictor | None:
    """The predictor of a layer's FFN, checked to make sense there (a ReLU-family FFN, no other FFN threshold)."""
    if predictors is None:
        return None
    path = f"model.layers.{index}.mlp"
    if path not in predictors:
        raise ValueError(f"fast_decoder: the predictors have no entry for {path!r} (they were trained on another "
                         "model?)")
    if act != _FATRELU:
        raise ValueError(f"fast_decoder: layer {index}: predictors need a ReLU or FATReLU FFN (relufy, prosparse); "
                         "this FFN's activation is smooth, so no unit is ever exactly zero")
    if cats is not None or "gate_up" in teal or "down" in teal:
        raise ValueError(f"fast_decoder: layer {index} has FFN thresholds (TEAL or CATS) and a predictor: expected one")
    return predictors[path]


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError(f"fast_decoder: parameter {name} is {p.dtype} on {p.device}: expected float32 on the "
                             "CPU (model.float().cpu())")


def _window(model: nn.Module, max_len: int) -> int:
    """The sliding attention window to apply (0: none, or none within max_len)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_len:
        return 0
    if config.model_type != "mistral":
        raise ValueError(f"fast_decoder: {config.model_type} with sliding_window {window} < max_len {max_len} is not "
                         "supported: expected max_len <= sliding_window")
    return int(window)


class FastDecoder:
    """A compiled batch-1 decoder over a model's weights: `logits` for a sequence, `generate` greedily.

    Holds its own KV cache for up to ``max_len`` positions; each call starts a fresh sequence. Weights in the
    "rows" layout are the model's own tensors (shared, not copied) except q/k/v, concatenated; "cols" weights
    are transposed copies. `timings` splits the time of the last call into attention, FFN, lm_head and rest.
    """

    def __init__(self, native, max_len: int, eos: set[int], layouts: dict[str, str]):
        self._native = native
        self.max_len = max_len
        self.eos = eos
        self.layouts = layouts

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), vocab) logits of a 1-D token sequence, one position after the other (as decoding sees them)."""
        ids = self._check_ids(ids, 0)
        self._native.reset_timings()
        return torch.stack([self._native.step(int(t), pos) for pos, t in enumerate(ids.tolist())])

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True, streamer=None
                 ) -> torch.Tensor:
        """Greedy continuation of a 1-D prompt: the new token ids (at most ``max_new_tokens``; fewer at EOS)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
        ids = self._check_ids(ids, max_new_tokens)
        self._native.reset_timings()
        start = time.perf_counter()
        for pos, token in enumerate(ids.tolist()[:-1]):
            self._native.step(token, pos)
        pos, token, new = len(ids) - 1, int(ids[-1]), []
        for _ in range(max_new_tokens):
            token = int(torch.argmax(self._native.step(token, pos)))
            new.append(token)
            pos += 1
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if stop_at_eos and token in self.eos:
                break
        self._seconds = time.perf_counter() - start
        return torch.tensor(new, dtype=torch.long)

    def timings(self) -> dict:
        """Seconds of the last call per part (attention: norm, q/k/v, RoPE, attention, o; FFN: norm, gate/up/down;
        lm_head: final norm and head; rest: embedding and everything outside the compiled step), the tokens
        stepped, and the fraction of sparse-product inputs or units computed (1.0 when dense)."""
        attention, ffn, head, rest, tokens, computed = self._native.timings()
        total = getattr(self, "_seconds", None)
        if total is not None:
            rest = max(rest, total - attention - ffn - head)
        return {"attention_s": attention, "ffn_s": ffn, "lm_head_s": head, "rest_s": rest, "tokens": int(tokens),
                "computed_fraction": computed}

    def _check_ids(self, ids: torch.Tensor, extra: int) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected a non-empty 1-D tensor of token ids, got shape {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() + extra > self.max_len:
            raise ValueError(f"{ids.numel()} prompt tokens + {extra} new ones exceed the decoder's max_len "
                             f"{self.max_len}: expected a shorter prompt or DecodeConfig(max_len=...)")
        return ids


def _rope_tables(model: nn.Module, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (max_len, head_dim) from the model's own rotary embedding: every RoPE variant it implements."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_len)[None]
    probe = torch.zeros(1, 1, dtype=torch.float32)
    cos, sin = rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def _embed_scale(model: nn.Module) -> float:
    """What the embedding module multiplies the table rows by (Gemma: sqrt(hidden)), read off the module."""
    embed = model.model.embed_tokens
    token = torch.zeros(1, dtype=torch.long)
    row = embed.weight[0]
    out = embed(token)[0]
    nonzero = row.abs() > 0
    return float((out[nonzero] / row[nonzero]).mean()) if bool(nonzero.any()) else 1.0


def _laid_out(weight: torch.Tensor, layout: str) -> torch.Tensor:
    w = weight.detach()
    return w.t().contiguous() if layout == "cols" else w.contiguous()


def _norm_weight(norm: nn.Module, family: _Family) -> torch.Tensor:
    w = norm.weight.detach().float()
    return (1.0 + w).contiguous() if family.norm_plus_one else w.contiguous()


def _resolve_layout(config: DecodeConfig, model: nn.Module) -> str:
    if config.layout != "auto":
        return config.layout
    from .tune import best_decode_layout

    return best_decode_layout(model.config.hidden_size, model.config.intermediate_size)


@torch.no_grad()
def fast_decoder(model: nn.Module, config: DecodeConfig | None = None, predictors: Predictors | None = None
                 ) -> FastDecoder:
    """A `FastDecoder` over ``model`` (a Hugging Face LLaMA-family causal LM, fp32, CPU), which is left unchanged.

    TEAL and CATS thresholds set on the model (`calibrate_thresholds`) are run sparsely: the decoder computes
    the thresholded model, skipping the weights of the zeroed entries. A ReLU-family model (`relufy`,
    `prosparse`) skips its zero FFN units exactly; with ``predictors`` (`train_predictors`, Deja Vu-style) it
    computes the gate only for the units they predict active, as `sparsify_for_inference` does in predictor mode,
    per token: units a predictor misses are lost (approximate); the first ``config.exact_prefix``
    positions are computed exactly.

    Needs the compiled kernels (a C++ compiler; built once, about a minute): without them this raises, and
    ``model.generate`` remains the way to decode.
    """
    config = config or DecodeConfig()
    family = _family(model)
    _check_weights(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.max_len > limit:
        raise ValueError(f"DecodeConfig.max_len={config.max_len} exceeds the model's max_position_embeddings {limit}")
    native = native_kernels(DECODE_SOURCE)
    if native is None:
        raise RuntimeError("fast_decoder needs leanformer's compiled kernels (a C++ compiler and ninja; "
                           "LEANFORMER_NATIVE=1): decode with model.generate instead")
    layout = _resolve_layout(config, model)
    inner = model.model
    if predictors is not None:
        predictors.check_fits(model)
    attn0 = inner.layers[0].self_attn
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = attn0.q_proj.out_features // heads
    cos, sin = _rope_tables(model, config.max_len)
    if cos.shape[1] != head_dim:
        raise ValueError(f"fast_decoder: rotary dimension {cos.shape[1]} != head_dim {head_dim} (partial RoPE) is "
                         "not supported")
    eps = float(inner.norm.variance_epsilon if hasattr(inner.norm, "variance_epsilon") else inner.norm.eps)
    decoder = native.Decoder(inner.embed_tokens.weight.detach().contiguous(), _embed_scale(model),
                             _norm_weight(inner.norm, family), model.lm_head.weight.detach().contiguous(), cos, sin,
                             heads, kv_heads, head_dim, eps, float(attn0.scaling), _window(model, config.max_len))
    layouts = {}
    for index, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        teal, cats = _layer_thresholds(index, layer)
        act, act_threshold = _activation(index, _own_activation(mlp.act_fn))
        predictor = _layer_predictor(index, predictors, act, cats, teal)
        if act == _FATRELU and predictor is None and cats is None and "gate_up" not in teal and "down" not in teal:
            cats = 0.0  # a ReLU-family FFN: its zero units are skipped, exactly (ProSparse models decode sparsely)
        chosen = {part: "cols" if part in teal else layout for part in ("qkv", "o", "gate_up", "down")}
        chosen["up"] = chosen["gate_up"]
        if cats is not None or predictor is not None:
            chosen["up"], chosen["down"] = "rows", "cols"
        if predictor is not None:
            chosen["gate_up"] = "rows"
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = (torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().contiguous()
                if family.qkv_bias and attn.q_proj.bias is not None else None)
        q_norm = _norm_weight(attn.q_norm, family) if family.qk_norm else None
        k_norm = _norm_weight(attn.k_norm, family) if family.qk_norm else None
        decoder.add_layer(_norm_weight(layer.input_layernorm, family), _laid_out(qkv, chosen["qkv"]), bias,
                          chosen["qkv"] == "cols", q_norm, k_norm, _laid_out(attn.o_proj.weight, chosen["o"]),
                          chosen["o"] == "cols", _norm_weight(layer.post_attention_layernorm, family),
                          _laid_out(mlp.gate_proj.weight, chosen["gate_up"]), chosen["gate_up"] == "cols",
                          _laid_out(mlp.up_proj.weight, chosen["up"]), chosen["up"] == "cols",
                          _laid_out(mlp.down_proj.weight, chosen["down"]), chosen["down"] == "cols", act,
                          act_threshold)
        if teal:
            decoder.set_input_thresholds(index, *(teal.get(k, -1.0) for k in ("qkv", "o", "gate_up", "down")))
        if cats is not None:
            decoder.set_ffn_threshold(index, float(cats))
        if predictor is not None:
            decoder.set_predictor(index, predictor.fc1.weight.detach().float().contiguous(),
                                  predictor.fc2.weight.detach().float().t().contiguous(),
                                  predictor.fc2.bias.detach().float().contiguous(), float(predictor.threshold))
        layouts[str(index)] = chosen
    decoder.set_exact_prefix(config.exact_prefix)
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return FastDecoder(decoder, config.max_len, eos, layouts)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every layer's projections and the LM head (not the embedding
    table: one row of it)."""
    total = model.lm_head.weight.numel()
    for layer in model.model.layers:
        total += sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    return total * model.lm_head.weight.element_size()


def bandwidth_limit_tokens_per_s(model: nn.Module, bytes_per_s: float) -> float:
    """Tokens/s if every weight byte were read at ``bytes_per_s`` and nothing else took time."""
    return bytes_per_s / weight_bytes_per_token(model) if bytes_per_s > 0 else math.nan

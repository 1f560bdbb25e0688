"""The compiled batch-1 decoder against the Hugging Face model it was built from: logits, tokens, sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from leanformer._native import kernels
from leanformer.data.text import lm_eval_batches
from leanformer.sparsity import (
    DecodeConfig,
    PredictorConfig,
    ReLUConfig,
    SparseInferenceConfig,
    ThresholdConfig,
    TopKConfig,
    apply_topk,
    calibrate_thresholds,
    fast_decoder,
    load_pretrained,
    relufy,
    save_pretrained,
    sparsify_for_inference,
    train_predictors,
)
from leanformer.sparsity.decode import DECODE_SOURCE

pytestmark = pytest.mark.skipif(kernels(DECODE_SOURCE) is None, reason="no C++ compiler for the decode kernels")

VOCAB = 120
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=96)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                         "low_freq_factor": 1.0,
                                                                         "high_freq_factor": 4.0,
                                                                         "original_max_position_embeddings": 32}),
    "llama-tied": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
}


def build(family: str, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """A random model; std 0.2 makes a wrong term show in the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def reference_tokens(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):]


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_tokens_equal_the_model(family, layout):
    model = build(family)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    decoder = fast_decoder(model, DecodeConfig(max_len=64, layout=layout))
    got = decoder.logits(ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale  # fp32 rounding only (sums in another order)
    prompt = ids[:5]
    assert torch.equal(decoder.generate(prompt, 20, stop_at_eos=False), reference_tokens(model, prompt, 20))


def test_generate_stops_at_eos_and_reports_timings():
    model = build("llama")
    prompt = torch.tensor([3, 4, 5])
    decoder = fast_decoder(model, DecodeConfig(max_len=64, layout="rows"))
    free = decoder.generate(prompt, 10, stop_at_eos=False)
    decoder.eos = {int(free[3])}
    stopped = decoder.generate(prompt, 10)
    assert torch.equal(stopped, free[: len(stopped)]) and int(stopped[-1]) == int(free[3]) and len(stopped) <= 4
    timings = decoder.timings()
    assert timings["tokens"] == len(prompt) - 1 + len(stopped)
    assert min(timings[k] for k in ("attention_s", "ffn_s", "lm_head_s", "rest_s")) >= 0
    assert timings["computed_fraction"] == 1.0


@pytest.mark.parametrize("method", ["teal", "cats"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_sparse_decoding_equals_the_thresholded_model(family, method, tmp_path):
    # smaller weights than the dense test's: an input that fp32 rounding puts on the other side of its threshold
    # (the decoder sums in another order) then changes the logits by little, not chaotically
    model = build(family, std=0.1)
    tokens = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(2))
    report = calibrate_thresholds(model, lm_eval_batches(tokens, 2, 32)[:2],
                                  ThresholdConfig(method=method, sparsity=0.5, allocation="uniform"))
    assert report.sparsity == pytest.approx(0.5)
    # other tokens than the calibration's: there, some values equal a threshold (a quantile of them), and the
    # decoder's fp32 rounding would decide their side
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    dense = fast_decoder(build(family, std=0.1), DecodeConfig(max_len=64, layout="rows")).logits(ids)
    tolerance = 1e-4 * expected.abs().max()
    assert (dense - expected).abs().max() > 10 * tolerance  # the thresholds change the model: the test means something
    decoder = fast_decoder(model, DecodeConfig(max_len=64, layout="rows"))
    got = decoder.logits(ids)
    assert (got - expected).abs().max() <= tolerance
    assert 0.3 < 1 - decoder.timings()["computed_fraction"] < 0.7  # about half of the inputs/units skipped
    prompt = ids[:4]
    assert torch.equal(decoder.generate(prompt, 16, stop_at_eos=False), reference_tokens(model, prompt, 16))
    # saved and reloaded, the same thresholds come back and decode the same
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    assert torch.equal(fast_decoder(again, DecodeConfig(max_len=64, layout="rows")).logits(ids), got)


def test_refuses_what_it_cannot_decode():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        fast_decoder(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    model = build("llama")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fast_decoder(model, DecodeConfig(max_len=1000))
    with pytest.raises(ValueError, match="layout"):
        DecodeConfig(layout="diagonal")
    with pytest.raises(ValueError, match="exact_prefix"):
        DecodeConfig(exact_prefix=-1)
    decoder = fast_decoder(model, DecodeConfig(max_len=8, layout="rows"))
    with pytest.raises(ValueError, match="max_len 8"):
        decoder.generate(torch.arange(5), 4)
    with pytest.raises(ValueError, match="1-D"):
        decoder.logits(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        decoder.logits(torch.tensor([VOCAB]))
    with pytest.raises(ValueError, match="bfloat16"):
        fast_decoder(build("llama").to(torch.bfloat16))
    with pytest.raises(ValueError, match="FFN activation .* is not supported"):
        fast_decoder(apply_topk(build("llama"), TopKConfig(8)), DecodeConfig(max_len=16))


@pytest.mark.parametrize("activation, threshold", [("relu", 0.0), ("fatrelu", 0.05)])
def test_relu_models_decode_exactly_and_skip_their_zero_units(activation, threshold):
    """A relufied model keeps a SiLU-looking config; the decoder goes by what the activation computes, and a
    ReLU-family FFN (ProSparse) skips its zero units."""
    model = relufy(build("llama", std=0.1), ReLUConfig(activation, threshold))
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    decoder = fast_decoder(model, DecodeConfig(max_len=32, layout="rows"))
    got = decoder.logits(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert decoder.timings()["computed_fraction"] < 0.7  # ReLU zeroes about half of the units, FATReLU more


def stepwise_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one forward per token with the KV cache, as decoding computes them: a sparse PyTorch FFN shares
    one set of units over the tokens of a call, so only one token per call is comparable with the decoder."""
    rows, cache = [], None
    with torch.no_grad():
        for token in ids:
            out = model(token.view(1, 1), use_cache=True, **({} if cache is None else {"cache": cache}))
            cache = out.cache
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_predictor_decoding_equals_the_pytorch_predictor_mode(family):
    """Deja Vu-style predictors on a ReLU model: the decoder computes what `sparsify_for_inference` computes in
    predictor mode (gate, up and down for the predicted units only)."""
    model = relufy(build(family, std=0.1))
    tokens = torch.randint(0, VOCAB, (600,), generator=torch.Generator().manual_seed(5))
    predictors, _ = train_predictors(model, [b[0] for b in lm_eval_batches(tokens, 4, 32)],
                                     PredictorConfig(rank=8, steps=60, target_recall=0.9), progress=False)
    no_prefix = SparseInferenceConfig("predictor", max_active=1.0, exact_prefix=0)
    reference = sparsify_for_inference(copy.deepcopy(model), no_prefix, predictors)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(6))
    expected = stepwise_logits(reference, ids)
    tolerance = 1e-4 * expected.abs().max()
    assert (stepwise_logits(model, ids) - expected).abs().max() > 10 * tolerance  # predictors miss units
    decoder = fast_decoder(model, DecodeConfig(max_len=64, exact_prefix=0), predictors)
    assert [decoder.layouts["0"][part] for part in ("gate_up", "up", "down")] == ["rows", "rows", "cols"]
    got = decoder.logits(ids)
    assert (got - expected).abs().max() <= tolerance
    exact = fast_decoder(model, DecodeConfig(max_len=64))
    exact_logits = exact.logits(ids)
    # the units computed are the predicted ones that are active: fewer than all the active ones
    assert decoder.timings()["computed_fraction"] < exact.timings()["computed_fraction"]
    prompt, new = ids[:4], decoder.generate(ids[:4], 12, stop_at_eos=False)
    expected_steps = stepwise_logits(reference, torch.cat([prompt, new[:-1]]))[len(prompt) - 1:]
    assert torch.equal(new, expected_steps.argmax(-1))
    # by default the first position (the attention sink) is computed exactly, the others predicted, in both
    sink_exact = fast_decoder(model, DecodeConfig(max_len=64), predictors).logits(ids)
    sink_reference = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig("predictor", max_active=1.0),
                                            predictors)
    assert (sink_exact - stepwise_logits(sink_reference, ids)).abs().max() <= tolerance
    assert (sink_exact[0] - exact_logits[0]).abs().max() <= tolerance
    assert (sink_exact[1:] - got[1:]).abs().max() > tolerance  # later positions read the exact first keys...
    assert (sink_exact[1:] - exact_logits[1:]).abs().max() > 10 * tolerance  # ...and are predicted themselves


def test_predictors_are_refused_where_they_cannot_apply():
    model = relufy(build("llama", std=0.1))
    tokens = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(5))
    predictors, _ = train_predictors(model, [b[0] for b in lm_eval_batches(tokens, 4, 32)],
                                     PredictorConfig(rank=8, steps=5), progress=False)
    with pytest.raises(ValueError, match="ReLU or FATReLU"):
        fast_decoder(build("llama", std=0.1), DecodeConfig(max_len=16), predictors)


def test_layout_choice_is_measured_once_and_cached(tmp_path, monkeypatch):
    from leanformer import _tuning
    from leanformer.sparsity import tune

    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path))
    calls = []
    real = tune.time_layouts

    def counted(shapes, runs=7):
        calls.append(shapes)
        return real(shapes, runs=2)

    monkeypatch.setattr(tune, "time_layouts", counted)
    monkeypatch.setattr(tune, "_KERNELS", "v1")
    first = tune.best_decode_layout(48, 136)
    assert first in ("rows", "cols") and len(calls) == 1
    assert tune.best_decode_layout(48, 136) == first and len(calls) == 1  # reused, not measured again
    assert _tuning.cache_path().is_file() and _tuning.cache_path().parent == tmp_path / "tuning"
    _tuning.forget()
    tune.best_decode_layout(48, 136)
    assert len(calls) == 2
    monkeypatch.setattr(tune, "_KERNELS", "v2")  # other kernels: measured again
    tune.best_decode_layout(48, 136)
    assert len(calls) == 3
    current = tune.best_decode_layout(48, 136)
    decoder = fast_decoder(build("llama"), DecodeConfig(max_len=16))  # "auto": the cached choice, not measured
    assert {entry["qkv"] for entry in decoder.layouts.values()} == {current} and len(calls) == 3

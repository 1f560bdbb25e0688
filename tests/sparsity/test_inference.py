"""Sparse FFN inference: exact mode equals the dense model on every FFN family; predictor mode computes exactly
the predicted units; paths are counted; bad requests change nothing."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from test_activations import FAMILIES, tiny_llama
from tests.conftest import COPY_KINDS, round_trip

from leanformer.sparsity import LowRankPredictor, ReLUConfig, TopKConfig, apply_topk, find_ffns, relufy
from leanformer.sparsity.inference import (
    SparseGatedFFN,
    SparseInferenceConfig,
    SparseInputLinear,
    calibrate_max_active,
    inference_report,
    sparsify_for_inference,
)


@pytest.fixture(autouse=True, params=["native", "reference"])
def path(request, monkeypatch):
    """Run each test on the compiled kernels and on the PyTorch path."""
    monkeypatch.setenv("LEANFORMER_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") \
        else out


def _sparse_counts(model) -> tuple[int, int]:
    report = inference_report(model)
    sparse = sum(n for r in report.values() for p, n in r["calls"].items() if p.startswith("sparse"))
    return sparse, sum(r["calls"].get("dense", 0) for r in report.values())


@pytest.mark.parametrize("activation", ["relu", "fatrelu", "topk"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_mode_equals_the_dense_model(family, activation, path):
    build, _ = FAMILIES[family]
    torch.manual_seed(0)
    model, inputs = build()
    relufy(model, ReLUConfig("fatrelu", 0.05)) if activation == "fatrelu" else relufy(model)
    if activation == "topk":
        apply_topk(model, TopKConfig(5))
    model.eval()
    dense = _run(model, inputs)
    sparse_model = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=1.0))
    torch.testing.assert_close(_run(sparse_model, inputs), dense, atol=2e-5, rtol=1e-4)
    sparse_calls, dense_calls = _sparse_counts(sparse_model)
    assert sparse_calls == len(find_ffns(model)) and dense_calls == 0
    expected = "sparse-native" if path == "native" else "sparse-torch"
    assert all(expected in r["calls"] for r in inference_report(sparse_model).values())


def test_hooks_on_the_activation_still_see_it_run():
    """The exact kernel applies ReLU/FATReLU itself, except when someone watches the activation module."""
    model, inputs = tiny_llama()
    relufy(model, ReLUConfig("fatrelu", 0.05))
    model.eval()
    act = find_ffns(model)[0].act
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    seen = []
    handle = act.register_forward_hook(lambda m, a, out: seen.append(out))
    _run(model, inputs)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape[-1] == model.config.intermediate_size and (seen[0] == 0).any()


def test_batch_union_and_dense_fallback_give_the_same_outputs():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    model.eval()
    ids = torch.randint(0, 50, (3, 6))
    dense = _run(model, {"input_ids": ids})
    always_dense = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=0.0))
    torch.testing.assert_close(_run(always_dense, {"input_ids": ids}), dense, atol=2e-5, rtol=1e-4)
    assert _sparse_counts(always_dense) == (0, 2)
    for name, layer in inference_report(always_dense).items():
        assert layer["computed_fraction"] == 1.0, name


def test_the_computed_units_are_the_union_over_tokens():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model, ReLUConfig("fatrelu", 0.1))
    model.eval()
    ids = torch.randint(0, 50, (1, 4))
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    mlp = model.model.layers[0].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].reshape(-1, 32)))
    _run(model, {"input_ids": ids})
    union = (mlp.act_fn(mlp.gate_proj(seen["x"])) != 0).any(0).float().mean().item()
    assert inference_report(model)["model.layers.0.mlp"]["computed_fraction"] == pytest.approx(union)
    assert 0 < union < 1


def test_generate_gives_the_same_tokens_and_decodes_sparsely():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    model.eval()
    prompt = torch.randint(0, 50, (1, 5))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(prompt, **kwargs)
        sparse_model = sparsify_for_inference(copy.deepcopy(model), SparseInferenceConfig(max_active=0.9))
        assert torch.equal(sparse_model.generate(prompt, **kwargs), dense)
    assert _sparse_counts(sparse_model)[0] >= 2 * 11  # every one-token decoding step of both layers


def test_state_dict_is_unchanged_and_down_weight_is_neuron_major():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.t().is_contiguous()
    assert isinstance(model.model.layers[0].mlp, SparseGatedFFN)


def test_plain_ffns_swap_only_the_down_linear():
    build, _ = FAMILIES["hf_bert"]
    model, _ = build()
    relufy(model)
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    down = model.encoder.layer[0].output.dense
    assert isinstance(down, SparseInputLinear) and (down.in_features, down.out_features) == (64, 32)


class _PredictAll(nn.Module):
    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep

    def predict(self, x):
        return self.keep.expand(x.shape[0], -1)


def test_predictor_mode_computes_exactly_the_predicted_units():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    model.eval()
    ids = torch.randint(0, 50, (1, 6))
    dense = _run(model, {"input_ids": ids})
    keep = torch.rand(64) < 0.5
    reference = copy.deepcopy(model)
    for layer in reference.model.layers:  # the dense FFN with the unpredicted units removed
        layer.mlp.down_proj.weight.data[:, ~keep] = 0
    predictors = {ffn.name: _PredictAll(torch.ones(64, dtype=torch.bool)) for ffn in find_ffns(model)}
    predicting = SparseInferenceConfig("predictor", max_active=1.0)
    everything = sparsify_for_inference(copy.deepcopy(model), predicting, predictors)
    torch.testing.assert_close(_run(everything, {"input_ids": ids}), dense, atol=2e-5, rtol=1e-4)
    predictors = {name: _PredictAll(keep) for name in predictors}
    half = sparsify_for_inference(copy.deepcopy(model), dataclasses.replace(predicting, exact_prefix=0), predictors)
    expected = _run(reference, {"input_ids": ids})
    torch.testing.assert_close(_run(half, {"input_ids": ids}), expected, atol=2e-5, rtol=1e-4)
    assert "predictor" not in " ".join(half.state_dict())
    # by default the first position (the attention sink) is dense: its logits are the dense model's, and the
    # others read its exact keys and values but are predicted themselves
    sink = sparsify_for_inference(model, SparseInferenceConfig("predictor", max_active=1.0), predictors)
    got = _run(sink, {"input_ids": ids})
    torch.testing.assert_close(got[:, 0], dense[:, 0], atol=2e-5, rtol=1e-4)
    assert (got[:, 1:] - expected[:, 1:]).abs().max() > 1e-3
    assert (got[:, 1:] - dense[:, 1:]).abs().max() > 1e-3


def test_the_exact_prefix_follows_the_positions_of_generate():
    """With the KV cache and with left padding, the tokens at position 0 are the dense model's: positions come
    from ``position_ids`` (left padding) or the cache's length, never from where a token sits in the call."""
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    model.eval()
    dense = copy.deepcopy(model)
    keep = torch.rand(64) < 0.5
    predictors = {f.name: _PredictAll(keep) for f in find_ffns(model)}
    config = SparseInferenceConfig("predictor", max_active=1.0, exact_prefix=2)
    sparse = sparsify_for_inference(model, config, predictors)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # the second row is left-padded: its sequence starts at column 2
    expected = _run(dense, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        got = sparse(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got[0, :2], expected[0, :2], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[1, 2:4], expected[1, 2:4], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(got[0, 2:], expected[0, 2:], atol=1e-3)
        # step by step with the cache: the first two calls dense, the third predicted
        cache, rows = None, []
        for t in range(3):
            out = sparse(input_ids=ids[:1, t:t + 1], use_cache=True, **({} if cache is None else {"cache": cache}))
            cache = out.cache
            rows.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(rows[:2]), expected[0, :2], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(rows[2], expected[0, 2], atol=1e-3)
    assert inference_report(sparse)["model.layers.0.mlp"]["calls"]["dense"] > 0


def test_auto_calibration_gives_one_fraction_per_shape():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    ffn = find_ffns(model)[0]
    assert 0.0 <= calibrate_max_active(ffn, runs=2) <= 0.9
    assert 0.0 <= calibrate_max_active(ffn, "predictor", runs=2) <= 0.9
    sparsify_for_inference(model)
    limits = {r["max_active"] for r in inference_report(model).values()}
    assert len(limits) == 1 and 0.0 <= limits.pop() <= 0.9


def test_bad_requests_raise_and_leave_the_model_alone():
    torch.manual_seed(0)
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: activation SiLUActivation is not sparse.*relufy"):
        sparsify_for_inference(model)
    relufy(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="mode='fast': expected one of exact, predictor"):
        SparseInferenceConfig("fast")
    with pytest.raises(ValueError, match="needs predictors="):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"))
    with pytest.raises(ValueError, match="only used by mode='predictor'"):
        sparsify_for_inference(model, SparseInferenceConfig(), {})
    with pytest.raises(ValueError, match="predictors have no entry for FFN 'model.layers.0.mlp'"):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"), {})
    with pytest.raises(ValueError, match=r"max_active=1.5: expected 'auto' or a fraction in \[0, 1\]"):
        SparseInferenceConfig(max_active=1.5)
    with pytest.raises(ValueError, match="exact_prefix=-1"):
        SparseInferenceConfig(exact_prefix=-1)
    with pytest.raises(ValueError, match="expected a SparseInferenceConfig, got 'predictor'"):
        sparsify_for_inference(model, "predictor")  # the loose-argument form of earlier versions
    apply_topk(model, TopKConfig(4))
    with pytest.raises(ValueError, match="needs an elementwise activation"):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"), {f.name: None for f in find_ffns(model)})
    assert all(isinstance(layer.mlp, nn.Module) and not isinstance(layer.mlp, SparseGatedFFN)
               for layer in model.model.layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    with pytest.raises(ValueError, match="already has sparse-inference FFNs"):
        sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))


def test_predictor_mode_refuses_plain_ffns():
    build, _ = FAMILIES["hf_bert"]
    model, _ = build()
    relufy(model)
    with pytest.raises(ValueError, match="mode='predictor' supports gated FFNs"):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"), {f.name: None for f in find_ffns(model)})


def test_predictors_of_another_shape_are_refused():
    from leanformer.sparsity.predictor import LowRankPredictor, Predictors

    torch.manual_seed(0)
    model, _ = tiny_llama()
    relufy(model)
    wrong = Predictors({ffn.name: LowRankPredictor(32, 65, 4) for ffn in find_ffns(model)})
    with pytest.raises(ValueError, match="maps 32 -> 65 features, but the FFN has 32 inputs and 64 hidden units"):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"), wrong)
    right = Predictors({ffn.name: LowRankPredictor(32, 64, 4) for ffn in find_ffns(model)})
    sparsify_for_inference(model, SparseInferenceConfig("predictor", max_active=1.0), right)
    assert isinstance(model.model.layers[1].mlp, SparseGatedFFN)


def _sparse_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SparseGatedFFN, SparseInputLinear))]


def _down_weight(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, SparseInputLinear) else module.get_submodule(module._roles[2]).weight


def _assert_copy_runs_and_counts_on_its_own(model: nn.Module, inputs, how: str) -> nn.Module:
    """The copy gives the original's outputs, keeps its down weights neuron-major (a copy that lost the layout
    would re-lay them out on every call) and counts its calls in its own report; returns the copy."""
    expected = _run(model, inputs)
    twin = round_trip(model, how)
    assert all(_down_weight(m).t().is_contiguous() for m in _sparse_modules(twin))
    inference_report(model, reset=True)
    inference_report(twin, reset=True)
    torch.testing.assert_close(_run(twin, inputs), expected, atol=0, rtol=0)
    counts = _sparse_counts(twin)
    assert counts[0] == len(_sparse_modules(model)) and _sparse_counts(model) == (0, 0)
    _run(model, inputs)
    assert _sparse_counts(twin) == counts == _sparse_counts(model)
    return twin


@pytest.mark.parametrize("how", COPY_KINDS)
@pytest.mark.parametrize("family", ["hf_bert", "hf_llama", "our_swin", "timm_vit"])
def test_a_copy_of_a_sparse_model_runs_and_counts_on_its_own(family, how, path):
    build, _ = FAMILIES[family]
    torch.manual_seed(0)
    model, inputs = build()
    relufy(model)
    sparsify_for_inference(model.eval(), SparseInferenceConfig(max_active=1.0))
    _assert_copy_runs_and_counts_on_its_own(model, inputs, how)


@pytest.mark.parametrize("how", COPY_KINDS)
def test_a_copy_of_a_predictor_mode_model_has_its_own_predictors(how, path):
    torch.manual_seed(0)
    model, inputs = tiny_llama()
    relufy(model)
    predictors = {ffn.name: LowRankPredictor(32, 64, 4) for ffn in find_ffns(model)}
    sparsify_for_inference(model.eval(), SparseInferenceConfig("predictor", max_active=1.0), predictors)
    twin = _assert_copy_runs_and_counts_on_its_own(model, inputs, how)
    assert _sparse_counts(twin)[1] == 2  # the exact first position ran dense: the copy tracks its own positions
    originals = [m.predictor for m in _sparse_modules(model)]
    assert all(m.predictor is not p for m, p in zip(_sparse_modules(twin), originals, strict=True))


def test_auto_max_active_is_measured_once_per_machine_and_shape(tmp_path, monkeypatch):
    """max_active='auto' measures the crossover of the compiled and of the PyTorch sparse path once per FFN shape,
    keeps the backend sparse for more of the range and uses it, and caches the choice."""
    from leanformer import _tuning
    from leanformer.sparsity import inference
    from leanformer.sparsity.kernels import backend

    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path))
    calls = []
    built = backend(torch.zeros(1)) == "native"

    def counted(ffn, mode="exact", native=True, **kwargs):
        calls.append((ffn.in_features, ffn.hidden_features, mode, native))
        return 0.25 if native else 0.375  # here the PyTorch path stays faster for longer

    def fresh():
        torch.manual_seed(0)
        return relufy(tiny_llama()[0])

    monkeypatch.setattr(inference, "calibrate_max_active", counted)
    first = sparsify_for_inference(fresh())
    assert len(calls) == (2 if built else 1)  # every FFN of one shape: one measurement per backend
    assert {r["max_active"] for r in inference_report(first).values()} == {0.375}
    with torch.no_grad():
        first(torch.randint(0, 50, (1, 1)))
    paths = {path for r in inference_report(first).values() for path in r["calls"]}
    assert "sparse-native" not in paths  # the measured choice runs, not the compiled kernels by default
    measured = len(calls)
    sparsify_for_inference(fresh())
    assert len(calls) == measured  # the cached choice: not measured again
    cached = json.loads(_tuning.cache_path().read_text())["choices"]["sparse_path"]
    assert [entry["backend"] for entry in cached.values()] == ["torch"]
    sparsify_for_inference(fresh(), SparseInferenceConfig(max_active=0.5))
    assert len(calls) == measured  # a fixed fraction measures nothing


def test_speed_timing_runs_each_mode_on_its_own_path():
    """`time_sparse_ffn`'s "exact-torch" times the PyTorch sparse path by asking the modules for it, not by a
    process-wide switch: "exact" beside it still runs the compiled kernels where they are built."""
    from leanformer.sparsity.kernels import backend
    from leanformer.sparsity.speed import time_sparse_ffn

    result = time_sparse_ffn(32, 64, sparsity=0.8, modes=("exact", "exact-torch"), runs=1, layers=2)
    assert result["exact-torch"]["paths"] == ["sparse-torch"]
    built = backend(torch.zeros(1)) == "native"
    assert result["exact"]["paths"] == (["sparse-native"] if built else ["sparse-torch"])

"""Activation predictors: recording against a direct computation, training to the target recall, calibration,
evaluation against a hand-computed reference, save/load and its validation, config validation."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from leanformer.sparsity.activations import relufy
from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.predictor import (
    LowRankPredictor,
    PredictorConfig,
    Predictors,
    evaluate_predictors,
    record_ffn_activity,
    train_predictors,
)

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(intermediate_size: int = 96, layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=intermediate_size,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    return relufy(transformers.LlamaForCausalLM(config))


def id_batches(n: int, seed: int, shape: tuple[int, int] = (4, 32)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, shape, generator=generator) for _ in range(n)]


class Mlp(nn.Module):
    """A plain (non-gated) ReLU FFN, found by the built-in table through its class name, as timm's Mlp is."""

    def __init__(self, dim: int = 16, hidden: int = 48):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    """Two residual Mlps; optionally scribbles over its input after the first one or fails after both."""

    def __init__(self, dim: int = 16, hidden: int = 48):
        super().__init__()
        self.blocks = nn.ModuleList([Mlp(dim, hidden), Mlp(dim, hidden)])
        self.scribble = False
        self.fail = False

    def forward(self, x, attention_mask=None):
        h = x + self.blocks[0](x)
        if self.scribble:
            x.zero_()  # the first FFN's input, modified in place after the FFN ran
        h = h + self.blocks[1](h)
        if self.fail:
            raise RuntimeError("boom")
        return h


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def counts_reference(predictor: LowRankPredictor, x: torch.Tensor, active: torch.Tensor) -> tuple[float, float, float]:
    """(recall, precision, predicted fraction) with the predictor written out as matrices."""
    logits = x.float() @ predictor.fc1.weight.T @ predictor.fc2.weight.T + predictor.fc2.bias
    predicted = logits > predictor.threshold
    tp = (predicted & active).sum().item()
    return tp / active.sum().item(), tp / predicted.sum().item(), predicted.float().mean().item()


# --- recording -----------------------------------------------------------------------------------------------------


def test_recording_matches_the_gated_ffn_computed_directly():
    model = tiny_llama()
    batches = id_batches(3, seed=1)
    seen = {}
    handles = [ffn.module.register_forward_pre_hook(lambda m, args, name=ffn.name: seen.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]).clone())) for ffn in find_ffns(model)]
    data = record_ffn_activity(model, batches, max_tokens=10_000)
    for handle in handles:
        handle.remove()

    assert list(data) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for ffn in find_ffns(model):
        x, active = data[ffn.name]
        assert x.shape == (3 * 4 * 32, 32) and active.shape == (3 * 4 * 32, 96)
        assert x.dtype == torch.float32 and active.dtype == torch.bool and x.device.type == active.device.type == "cpu"
        assert torch.equal(x, torch.cat(seen[ffn.name]))  # every token, in order
        x1 = torch.relu(F.linear(x, ffn.gate.weight)) * F.linear(x, ffn.up.weight)  # LLaMA: relu(gate(x)) * up(x)
        assert torch.equal(active, x1 != 0)
        assert 0.3 < active.float().mean() < 0.7  # a random relufied gate fires about half the time


def test_recording_a_plain_ffn_subsamples_the_same_tokens_in_every_layer():
    model = Net()
    batches = [torch.randn(4, 8, 16) for _ in range(4)]  # 128 tokens
    full = record_ffn_activity(model, batches, max_tokens=1000)
    for (x, active), block in zip(full.values(), model.blocks, strict=True):
        assert x.shape == (128, 16)
        assert torch.equal(active, torch.relu(block.fc1(x)) != 0)

    sub = record_ffn_activity(model, batches, max_tokens=40, seed=3)
    positions = []
    for name, (x, active) in sub.items():
        assert x.shape == (40, 16) and active.shape == (40, 48)
        rows = [torch.nonzero((full[name][0] == row).all(1)).flatten().tolist() for row in x]
        assert all(len(r) == 1 for r in rows)  # each kept token is one of the recorded ones ...
        index = [r[0] for r in rows]
        assert index == sorted(set(index))  # ... kept once and in stream order ...
        assert torch.equal(active, full[name][1][index])  # ... with its own mask
        positions.append(index)
    assert positions[0] == positions[1]
    again = record_ffn_activity(model, batches, max_tokens=40, seed=3)
    other = record_ffn_activity(model, batches, max_tokens=40, seed=4)
    name = "blocks.0"
    assert torch.equal(again[name][0], sub[name][0]) and not torch.equal(other[name][0], sub[name][0])


def test_recording_copies_inputs_leaves_out_padding_and_cleans_up():
    model = Net().train()
    model.scribble = True
    original = torch.randn(2, 5, 16)
    data = record_ffn_activity(model, [original.clone()])
    assert torch.equal(data["blocks.0"][0], original.reshape(10, 16))  # as they were when the FFN ran
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    data = record_ffn_activity(model, [{"x": original.clone(), "attention_mask": mask}])
    assert torch.equal(data["blocks.0"][0], original[mask.bool()])  # the 8 real tokens
    assert data["blocks.1"][0].shape == (8, 16)
    assert model.training and all(m.training for m in model.modules()) and no_hooks(model)

    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        record_ffn_activity(model, [torch.randn(2, 16)])
    assert model.training and no_hooks(model)
    with pytest.raises(ValueError, match="at least one batch"):
        record_ffn_activity(model, [])
    with pytest.raises(ValueError, match="attention mask"):
        record_ffn_activity(Net(), [{"x": torch.randn(2, 5, 16), "attention_mask": torch.ones(2, 4)}])


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_recording_keeps_no_activation_alive_after_a_failure():
    model = Net()
    model.blocks[1].act = Boom()  # fails between the second FFN's up and down projections
    refs = []
    model.blocks[1].fc1.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    with pytest.raises(RuntimeError, match="boom"):
        record_ffn_activity(model, [torch.randn(4, 16)])
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None


# --- training, calibration, evaluation -----------------------------------------------------------------------------


def test_trained_predictors_reach_the_target_recall_on_new_tokens_and_skip_work():
    model = tiny_llama()
    config = PredictorConfig(target_recall=0.9)
    predictors, report = train_predictors(model, id_batches(8, seed=1), config, progress=False)
    assert predictors.names() == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer in report.layers:
        assert layer.tokens == round(1024 * config.val_fraction)
        assert layer.recall >= 0.9  # calibrated on these held-out tokens
        assert layer.threshold == float(predictors[layer.name].threshold)

    fresh = id_batches(4, seed=2)
    evaluated = evaluate_predictors(model, predictors, fresh)
    data = record_ffn_activity(model, fresh, max_tokens=10_000)
    for layer in evaluated.layers:
        x, active = data[layer.name]
        recall, precision, predicted = counts_reference(predictors[layer.name], x, active)
        assert layer.tokens == 512
        assert layer.recall == pytest.approx(recall) and layer.precision == pytest.approx(precision)
        assert layer.predicted_active_fraction == pytest.approx(predicted)
        assert layer.true_active_fraction == pytest.approx(active.float().mean().item())
        assert layer.recall >= 0.9 - 0.04
        assert layer.predicted_active_fraction < 0.85  # most of the inactive half is skipped ...
        assert layer.precision > layer.true_active_fraction + 0.15  # ... far better than guessing
    assert evaluated.mean_predicted_sparsity == pytest.approx(
        sum(1 - layer.predicted_active_fraction for layer in evaluated.layers) / 2)
    assert json.loads(json.dumps(evaluated.to_dict()))["layers"][1]["name"] == "model.layers.1.mlp"


def test_training_a_plain_ffn_is_deterministic_and_leaves_the_global_rng_alone():
    model = Net()
    batches = [torch.randn(8, 8, 16) for _ in range(4)]
    config = PredictorConfig(steps=150, rank=8, lr=1e-2, target_recall=0.95, seed=5)
    state = torch.get_rng_state()
    first, report = train_predictors(model, batches, config, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = train_predictors(model, batches, config, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first["blocks.0"].rank == 8 and report.mean_recall >= 0.95
    fresh = evaluate_predictors(model, first, [torch.randn(8, 8, 16) for _ in range(4)])
    assert fresh.mean_recall >= 0.95 - 0.03 and fresh.mean_predicted_sparsity > 0.2


def test_layers_that_never_or_always_fire_predict_nothing_or_everything():
    model = Net()
    with torch.no_grad():
        model.blocks[0].fc1.bias.fill_(-100.0)  # x1 always 0
        model.blocks[1].fc1.bias.fill_(100.0)  # x1 never 0
    predictors, report = train_predictors(model, [torch.randn(64, 16)], PredictorConfig(steps=5), progress=False)
    never, always = report.layers
    assert never.threshold == math.inf and never.predicted_active_fraction == 0 and never.true_active_fraction == 0
    assert always.threshold == -math.inf and always.predicted_active_fraction == 1 and always.true_active_fraction == 1
    assert never.recall == never.precision == always.recall == always.precision == 1.0
    x = torch.randn(3, 16)
    assert not predictors["blocks.0"].predict(x).any() and predictors["blocks.1"].predict(x).all()


def test_predict_is_logits_above_the_threshold():
    predictor = LowRankPredictor(16, 48, rank=4)
    predictor.threshold.fill_(0.3)
    x = torch.randn(2, 5, 16)
    logits = predictor(x)
    assert logits.shape == (2, 5, 48)
    expected = x @ predictor.fc1.weight.T @ predictor.fc2.weight.T + predictor.fc2.bias
    torch.testing.assert_close(logits, expected)
    mask = predictor.predict(x)
    assert mask.dtype == torch.bool and torch.equal(mask, logits > 0.3)
    assert 0 < mask.float().mean() < 1
    assert torch.equal(predictor.predict(x.to(torch.bfloat16)), predictor(x.to(torch.bfloat16)) > 0.3)
    with pytest.raises(ValueError, match="rank"):
        LowRankPredictor(16, 48, rank=0)


# --- Predictors: lookup, save/load, check_fits ---------------------------------------------------------------------


def trained_pair() -> tuple[nn.Module, Predictors]:
    model = tiny_llama()
    predictors, _ = train_predictors(model, id_batches(2, seed=1), PredictorConfig(steps=20), progress=False)
    return model, predictors


def test_lookup_by_ffn_name():
    predictors = Predictors({"a.b": LowRankPredictor(4, 8, 2), "c": LowRankPredictor(4, 6, 2)})
    assert predictors.names() == ["a.b", "c"] and "a.b" in predictors and "a" not in predictors
    assert predictors["c"].hidden_features == 6
    with pytest.raises(KeyError, match=r"'x'.*\['a.b', 'c'\]"):
        predictors["x"]
    with pytest.raises(ValueError, match="at least one"):
        Predictors({})
    with pytest.raises(ValueError, match="LowRankPredictor"):
        Predictors({"a": nn.Linear(2, 2)})


def test_save_load_round_trip_gives_the_same_predictions(tmp_path):
    model, predictors = trained_pair()
    path = predictors.save(tmp_path / "out")
    assert path == tmp_path / "out" / "predictors.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictors.safetensors"]  # no temp file left
    x = torch.randn(7, 32)
    for loaded in (Predictors.load(tmp_path / "out"), Predictors.load(path)):
        assert loaded.names() == predictors.names()
        loaded.check_fits(model)
        for name in predictors.names():
            assert torch.equal(loaded[name].predict(x), predictors[name].predict(x))
            assert loaded[name].threshold == predictors[name].threshold


def rewrite(path, drop=(), replace=None, metadata=None):
    """Rewrite a predictors file with tensors dropped/replaced or its metadata changed."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
        meta = {**f.metadata(), **(metadata or {})}
    tensors = {k: v for k, v in {**tensors, **(replace or {})}.items() if k not in drop}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage, message", [
    (dict(drop=["model.layers.1.mlp.fc2.bias"]), "'model.layers.1.mlp.fc2.bias' is missing"),
    (dict(replace={"model.layers.0.mlp.fc1.weight": torch.zeros(16, 31)}),
     r"'model.layers.0.mlp.fc1.weight' is torch.float32 of shape \(16, 31\), expected .* \(16, 32\)"),
    (dict(replace={"model.layers.0.mlp.threshold": torch.zeros(1)}), "'model.layers.0.mlp.threshold'"),
    (dict(replace={"model.layers.0.mlp.fc2.bias": torch.zeros(96, dtype=torch.int64)}),
     "'model.layers.0.mlp.fc2.bias' is torch.int64"),
    (dict(replace={"extra.weight": torch.zeros(2)}), r"unexpected tensors \['extra.weight'\]"),
    (dict(metadata={"layers": "[{not json"}), "metadata 'layers' is not valid JSON"),
    (dict(metadata={"layers": json.dumps([{"name": "model.layers.0.mlp", "in_features": 32}])}),
     "metadata 'layers' entry"),
    (dict(metadata={"format": "something-else"}), "metadata 'format' is 'something-else'"),
    (dict(metadata={"version": "99"}), "metadata 'version' is '99'"),
])
def test_load_rejects_damaged_files_naming_the_file_and_key(tmp_path, damage, message):
    _, predictors = trained_pair()
    path = predictors.save(tmp_path)
    rewrite(path, **damage)
    with pytest.raises(ValueError, match=message) as info:
        Predictors.load(tmp_path)
    assert str(path) in str(info.value)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'predictors.safetensors'} does not exist"):
        Predictors.load(tmp_path)
    garbage = tmp_path / "predictors.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Predictors.load(garbage)
    save_file({"a": torch.zeros(1)}, str(garbage))  # valid safetensors, no metadata
    with pytest.raises(ValueError, match="metadata 'format' is None"):
        Predictors.load(garbage)


def test_check_fits_rejects_other_models():
    model, predictors = trained_pair()
    predictors.check_fits(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' maps 32 -> 96 .* 32 inputs and 64 hidden"):
        predictors.check_fits(tiny_llama(intermediate_size=64))
    with pytest.raises(ValueError, match="no predictor for FFN 'model.layers.2.mlp'"):
        predictors.check_fits(tiny_llama(layers=3))
    with pytest.raises(ValueError, match=r"predictors for FFNs \['model.layers.1.mlp'\]"):
        predictors.check_fits(tiny_llama(layers=1))
    with pytest.raises(ValueError, match="hidden"):
        evaluate_predictors(tiny_llama(intermediate_size=64), predictors, id_batches(1, seed=0))


# --- config and report ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 2.0), ("target_recall", 0.0), ("target_recall", 1.01), ("steps", 0), ("steps", True),
    ("lr", 0.0), ("lr", float("nan")), ("batch_size", 0), ("max_tokens", 1), ("val_fraction", 0.0),
    ("val_fraction", 1.0), ("seed", "0"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}: expected"):
        PredictorConfig(**{field: value})


def test_default_rank_rule():
    config = PredictorConfig()
    assert [config.rank_for(d) for d in (8, 32, 384, 1024, 4096)] == [8, 16, 16, 32, 128]
    assert PredictorConfig(rank=7).rank_for(4096) == 7
    # LLaMA-7B FFN (4096 -> 11008, gated: 3 matrices): the predictor is ~1.4% of its multiply-adds
    rank = config.rank_for(4096)
    assert 0.01 < rank * (4096 + 11008) / (3 * 4096 * 11008) < 0.02


def test_train_rejects_empty_batches_and_a_wrong_config():
    with pytest.raises(ValueError, match="at least one batch"):
        train_predictors(Net(), [], progress=False)
    with pytest.raises(ValueError, match="PredictorConfig"):
        train_predictors(Net(), [torch.randn(4, 16)], {"steps": 3}, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        train_predictors(Net(), [torch.randn(1, 16)], progress=False)

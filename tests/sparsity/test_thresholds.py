"""TEAL and CATS thresholds: calibrated to the requested sparsity, on the model families users bring, and the same
model after save and reload (a plain reload refuses instead of silently dropping them)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import transformers

from leanformer import create_model, load_pretrained, save_pretrained
from leanformer.data.text import lm_eval_batches
from leanformer.sparsity import (
    InputSparseLinear,
    MagnitudeThreshold,
    ThresholdConfig,
    calibrate_thresholds,
    threshold_sparsity,
)

VOCAB = 80


def llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def lm_batches(seed: int = 0, count: int = 3):
    tokens = torch.randint(0, VOCAB, (count * 2 * 24 + 1,), generator=torch.Generator().manual_seed(seed))
    return lm_eval_batches(tokens, 2, 24)[:count]


def zeroed_fractions(model: nn.Module, batches) -> dict[str, float]:
    """Per thresholded module: the fraction of its input (TEAL) or output (CATS) entries it zeroes, measured."""
    counts: dict[str, list[int]] = {}

    def count(name, tensor, threshold):
        c = counts.setdefault(name, [0, 0])
        c[0] += int((tensor.abs() <= threshold).sum())
        c[1] += tensor.numel()

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, InputSparseLinear):
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: count(name, a[0], mod.threshold)))
        elif isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], MagnitudeThreshold):
            handles.append(m[0].register_forward_hook(
                lambda mod, a, out, name=name, t=m[1].threshold: count(name, out, t)))
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    for h in handles:
        h.remove()
    return {name: zero / total for name, (zero, total) in counts.items()}


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_uniform_thresholds_zero_the_requested_fraction(method):
    model = llama()
    batches = lm_batches()
    report = calibrate_thresholds(model, batches, ThresholdConfig(method=method, sparsity=0.4, allocation="uniform"))
    fractions = zeroed_fractions(model, batches)
    expected = 2 * 7 if method == "teal" else 2  # every block Linear, or every FFN activation
    assert len(fractions) == expected
    # the thresholds are quantiles of the dense model's magnitudes; thresholding upstream layers moves them a little
    assert all(abs(f - 0.4) < 0.03 for f in fractions.values()), fractions
    measured = threshold_sparsity(model, batches)
    assert measured["modules"].keys() == fractions.keys() and all(
        measured["modules"][k] == pytest.approx(f) for k, f in fractions.items())
    block = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n)
    skipped = 2 * 2 * 88 * 32 if method == "cats" else block  # CATS skips up and down only
    assert measured["model_wide"] == pytest.approx(0.4 * skipped / block, abs=0.03)
    assert report.sparsity == pytest.approx(0.4)
    assert report.loss_sparse != report.loss_dense
    if method == "teal":  # q/k/v share one threshold (one input), gate/up too
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.threshold == attn.k_proj.threshold == attn.v_proj.threshold > 0
        assert attn.o_proj.threshold != attn.q_proj.threshold


def test_greedy_meets_the_target_model_wide_and_spends_levels_where_they_cost_least():
    model = llama(layers=3)
    batches = lm_batches()
    config = ThresholdConfig(method="teal", sparsity=0.5, allocation="greedy", step=0.1)
    report = calibrate_thresholds(model, batches, config)
    assert report.sparsity == pytest.approx(0.5)  # the last step lands on the target
    levels = [g["sparsity"] for g in report.groups.values()]
    assert len(set(levels)) > 1  # not uniform
    by_kind = {}
    for key, group in report.groups.items():  # one level per kind: the same projection in every block
        by_kind.setdefault(key.replace(".0.", ".*.").replace(".1.", ".*.").replace(".2.", ".*."), set()).add(
            group["sparsity"])
    assert len(by_kind) == 4 and all(len(v) == 1 for v in by_kind.values())
    weights = {k: g["weights"] for k, g in report.groups.items()}
    assert report.sparsity == pytest.approx(sum(g["sparsity"] * weights[k] for k, g in report.groups.items())
                                            / sum(weights.values()))
    assert threshold_sparsity(model, batches)["model_wide"] >= 0.5 - 0.03  # measured, thresholds all applied


class _Block(nn.Module):
    """x + a(x) + 1e-3 * b(x): zeroing a's inputs changes the output, zeroing b's barely does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.a(x) + 1e-3 * self.b(x.clone())  # b reads another tensor: its own group


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_greedy_raises_the_cheap_kind_and_spares_the_costly_one():
    model = _Toy()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    loss = lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).mean()  # noqa: E731
    report = calibrate_thresholds(model, [(x, y)], ThresholdConfig(sparsity=0.4, step=0.1), loss_fn=loss)
    levels = {key: g["sparsity"] for key, g in report.groups.items()}
    assert levels == pytest.approx({"layers.0.a": 0.0, "layers.0.b": 0.8, "layers.1.a": 0.0, "layers.1.b": 0.8})
    assert report.sparsity == pytest.approx(0.4)
    uniform = calibrate_thresholds(_Toy(), [(x, y)], ThresholdConfig(sparsity=0.4, allocation="uniform"),
                                   loss_fn=loss)
    assert report.loss_sparse < uniform.loss_sparse / 10


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_hf_model_round_trips_and_refuses_a_plain_reload(method, tmp_path):
    model = llama()
    calibrate_thresholds(model, lm_batches(), ThresholdConfig(method=method, sparsity=0.5, allocation="uniform"))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["leanformer"]["version"] == 2 and method in config["hidden_act"]
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error for an unknown activation name
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    reloaded = load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert zeroed_fractions(reloaded, lm_batches()).keys() == zeroed_fractions(model, lm_batches()).keys()


def test_other_families_bert_timm_vit_and_ours():
    """TEAL groups Linears by the tensor they read, whatever the model: BERT's query/key/value, timm's fused qkv."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    report = calibrate_thresholds(bert, [(ids, ids)], ThresholdConfig(sparsity=0.3, allocation="uniform"))
    query = next(g for g in report.groups.values() if g["members"][0].endswith("attention.self.query"))
    assert [m.rsplit(".", 1)[1] for m in query["members"]] == ["query", "key", "value"]
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    swin = create_model("swin_nano_patch2_window4_32", num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model in (vit, swin):
        batch = (images, torch.tensor([1, 3]))
        for method in ("teal", "cats"):
            r = calibrate_thresholds(model, [batch], ThresholdConfig(method=method, sparsity=0.3, allocation="uniform"))
            fractions = zeroed_fractions(model, [batch])
            assert fractions and all(abs(f - 0.3) < 0.02 for f in fractions.values()), (type(model), method)
            assert r.sparsity == pytest.approx(0.3)


def test_our_backbone_round_trips_through_safetensors_metadata(tmp_path):
    model = create_model("swin_nano_patch2_window4_32", num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate_thresholds(model, [(images, torch.tensor([0, 1]))], ThresholdConfig(sparsity=0.4, allocation="uniform"))
    with torch.no_grad():
        expected = model(images)
    save_pretrained(model, tmp_path)
    reloaded = load_pretrained(tmp_path, create_model("swin_nano_patch2_window4_32", num_classes=5).eval())
    with torch.no_grad():
        assert torch.equal(reloaded(images), expected)
    with pytest.raises(ValueError, match="load_pretrained|transform"):
        create_model("swin_nano_patch2_window4_32", num_classes=5, checkpoint_path=tmp_path / "model.safetensors")


def test_a_new_calibration_replaces_the_old_one():
    model = llama()
    calibrate_thresholds(model, lm_batches(), ThresholdConfig(method="teal", sparsity=0.5, allocation="uniform"))
    calibrate_thresholds(model, lm_batches(), ThresholdConfig(method="cats", sparsity=0.5, allocation="uniform"))
    assert not any(isinstance(m, InputSparseLinear) for m in model.modules())
    assert sum(isinstance(m, MagnitudeThreshold) for m in model.modules()) == 2


@pytest.mark.parametrize("field, value, match", [
    ("method", "dejavu", "method"), ("sparsity", 1.0, "sparsity"), ("sparsity", True, "sparsity"),
    ("allocation", "random", "allocation"), ("step", 0, "step"), ("max_level", 0.3, "max_level"),
    ("max_level", 1.0, "max_level"), ("max_samples", 3, "max_samples")])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ThresholdConfig(**{field: value})


def test_bad_records_are_refused_naming_the_file(tmp_path):
    model = llama()
    calibrate_thresholds(model, lm_batches(), ThresholdConfig(sparsity=0.3, allocation="uniform"))
    save_pretrained(model, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    path_key = next(iter(config["leanformer"]["inputs"]))
    config["leanformer"]["inputs"][path_key] = -1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*inputs"):
        load_pretrained(tmp_path)
    config["leanformer"]["inputs"] = {"model.layers.9.mlp.down_proj": 0.1}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers.9"):
        load_pretrained(tmp_path)
    config["leanformer"]["version"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version 3"):
        load_pretrained(tmp_path)

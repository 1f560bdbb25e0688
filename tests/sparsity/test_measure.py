"""measure_sparsity: exact against hand-computed and directly computed references, masks, hooks, report."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn

from leanformer import create_model
from leanformer.sparsity.activations import relufy
from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.measure import SparsityReport, measure_sparsity


class Mlp(nn.Module):
    """Found by the built-in table (class name Mlp): identity fc1/fc2 around ReLU, so x1 = relu(x).

    Keeps a weak reference to its last x1, to show that measuring does not keep it alive.
    """

    def __init__(self, dim: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(dim, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.eye_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.last_x1 = None

    def forward(self, x):
        x1 = self.act(self.fc1(x))
        self.last_x1 = weakref.ref(x1)
        return self.fc2(x1)


class Toy(nn.Module):
    """Takes HF-style keyword arguments; can fail after its FFN ran."""

    def __init__(self):
        super().__init__()
        self.mlp = Mlp()
        self.fail = False

    def forward(self, x, attention_mask=None):
        out = self.mlp(x)
        if self.fail:
            raise RuntimeError("boom")
        return out


# sample 0: three real tokens with 3, 2, 1 zeros; sample 1: one real token with 3 zeros, two padding tokens
TOKENS = torch.tensor([[[1.0, -1, -1, -1], [1, 1, -1, -1], [1, 1, 1, -1]],
                       [[1.0, -1, -1, -1], [-1, -1, -1, 1], [-1, -1, -1, 1]]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_hand_computed_statistics_with_and_without_the_padding_mask():
    masked = measure_sparsity(Toy(), [{"x": TOKENS, "attention_mask": MASK}]).layers[0]
    fractions = torch.tensor([0.75, 0.5, 0.25, 0.75], dtype=torch.float64)
    assert (masked.tokens, masked.samples, masked.hidden) == (4, 2, 4)
    assert masked.mean_sparsity == pytest.approx(0.5625, abs=1e-15)
    assert masked.union_active_fraction == pytest.approx((0.75 + 0.25) / 2, abs=1e-15)
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        assert getattr(masked, name) == pytest.approx(float(torch.quantile(fractions, q)), abs=1e-12)

    unmasked = measure_sparsity(Toy(), [{"x": TOKENS, "attention_mask": MASK}], mask_key=None).layers[0]
    assert unmasked.tokens == 6
    assert unmasked.mean_sparsity == pytest.approx(3.75 / 6, abs=1e-15)
    assert unmasked.union_active_fraction == pytest.approx((0.75 + 0.5) / 2, abs=1e-15)


def test_statistics_accumulate_over_batches_and_all_padding_samples_drop_out():
    batches = [{"x": TOKENS[:1]}, {"x": TOKENS[1:], "attention_mask": MASK[1:]},
               {"x": TOKENS[1:], "attention_mask": torch.zeros(1, 3, dtype=torch.long)}]
    layer = measure_sparsity(Toy(), iter(batches)).layers[0]
    assert (layer.tokens, layer.samples) == (4, 2)
    assert layer.mean_sparsity == pytest.approx(0.5625, abs=1e-15)
    assert layer.union_active_fraction == pytest.approx(0.5, abs=1e-15)


def test_two_dimensional_x1_has_no_union_and_tuple_batches_work():
    layer = measure_sparsity(Toy(), [(TOKENS[0],), [TOKENS[1]]]).layers[0]
    assert layer.tokens == 6 and layer.union_active_fraction is None and layer.samples == 0
    assert layer.mean_sparsity == pytest.approx(3.75 / 6, abs=1e-15)


def reference(x1s: list[torch.Tensor]) -> dict:
    """Direct computation from the full x1 tensors of one run."""
    per_token = torch.cat([(x1 == 0).reshape(-1, x1.shape[-1]).double().mean(-1) for x1 in x1s])
    union = torch.cat([(x1 != 0).reshape(x1.shape[0], -1, x1.shape[-1]).any(1).double().mean(-1) for x1 in x1s])
    return {"tokens": per_token.numel(), "mean_sparsity": float(per_token.mean()),
            "p10": float(torch.quantile(per_token, 0.1)), "p50": float(torch.quantile(per_token, 0.5)),
            "p90": float(torch.quantile(per_token, 0.9)), "union_active_fraction": float(union.mean())}


def assert_matches(report: SparsityReport, expected: list[dict]) -> None:
    assert len(report.layers) == len(expected)
    for layer, ref in zip(report.layers, expected, strict=True):
        assert layer.tokens == ref["tokens"]
        for key in ("mean_sparsity", "p10", "p50", "p90", "union_active_fraction"):
            assert getattr(layer, key) == pytest.approx(ref[key], abs=1e-12), (layer.name, key)
    assert report.average_sparsity == pytest.approx(sum(r["mean_sparsity"] for r in expected) / len(expected),
                                                    abs=1e-12)


def test_relufied_llama_matches_x1_computed_directly():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50)
    model = relufy(transformers.LlamaForCausalLM(config).eval())
    batches = [{"input_ids": torch.randint(0, 50, (2, 7))}, {"input_ids": torch.randint(0, 50, (3, 5))}]
    x1s: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(mlp, args):
            x = args[0]
            x1s.setdefault(name, []).append(torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return hook

    handles = [ffn.module.register_forward_pre_hook(capture(ffn.name)) for ffn in find_ffns(model)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    expected = [reference(x1s[ffn.name]) for ffn in find_ffns(model)]
    report = measure_sparsity(model, batches)
    assert_matches(report, expected)
    assert 0 < report.average_sparsity < 1
    assert report.nonzero_percent == pytest.approx(100 * (1 - report.average_sparsity))


def test_relufied_msmlp_nhwc_matches_x1_computed_directly():
    model = relufy(create_model("msmlp_tiny", img_size=32, embed_dim=20, depths=(1, 1), num_classes=10,
                                mix_size=[[1, 1, 3, 5, 7], [1, 3, 3, 5, 7]]).eval())
    x = torch.randn(3, 3, 32, 32)
    x1s: dict[str, list[torch.Tensor]] = {}
    handles = [ffn.up.register_forward_hook(lambda _m, _a, out, name=ffn.name: x1s.setdefault(name, []).append(
        torch.relu(out))) for ffn in find_ffns(model)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert all(x1s[name][0].dim() == 4 for name in x1s)  # NHWC: H and W are the sequence
    assert_matches(measure_sparsity(model, [x]), [reference(x1s[ffn.name]) for ffn in find_ffns(model)])


def test_bert_padding_is_excluded():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50)
    model = relufy(transformers.BertModel(config))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": torch.randint(1, 50, (2, 6)), "attention_mask": mask}
    x1s: dict[str, list[torch.Tensor]] = {}
    handles = [ffn.down.register_forward_pre_hook(lambda _m, args, name=ffn.name: x1s.setdefault(name, []).append(
        args[0])) for ffn in find_ffns(model)]
    with torch.no_grad():
        model.eval()(**batch)
    for handle in handles:
        handle.remove()
    report = measure_sparsity(model, [batch])
    for layer, ffn in zip(report.layers, find_ffns(model), strict=True):
        x1 = x1s[ffn.name][0]
        real = x1[mask.bool()]
        assert layer.tokens == 9
        assert layer.mean_sparsity == pytest.approx(float((real == 0).double().mean()), abs=1e-12)
        union = [(x1[0] != 0).any(0).double().mean(), (x1[1, :3] != 0).any(0).double().mean()]
        assert layer.union_active_fraction == pytest.approx(float(sum(union) / 2), abs=1e-12)
    assert all(layer.tokens == 12 for layer in measure_sparsity(model, [batch], mask_key=None).layers)


def test_hooks_are_removed_modes_restored_and_no_activation_kept_alive():
    model = Toy().train()
    model.mlp.fc1.eval()  # a mixed state must come back as it was
    measure_sparsity(model, [{"x": TOKENS}])
    gc.collect()
    assert model.mlp.last_x1 is not None and model.mlp.last_x1() is None
    assert not model.mlp.fc2._forward_pre_hooks
    assert model.training and model.mlp.training and not model.mlp.fc1.training

    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        measure_sparsity(model, [{"x": TOKENS}])
    assert not model.mlp.fc2._forward_pre_hooks
    assert model.training and not model.mlp.fc1.training


def test_bad_inputs_raise_clear_errors():
    model = Toy()
    with pytest.raises(ValueError, match="at least one batch"):
        measure_sparsity(model, [])
    with pytest.raises(ValueError, match="each batch must be a tensor, a tuple/list .* got str"):
        measure_sparsity(model, ["not a batch"])
    with pytest.raises(ValueError, match=r"attention mask of shape \(2, 2\) does not match the FFN's tokens \(2, 3\)"):
        measure_sparsity(model, [{"x": TOKENS, "attention_mask": MASK[:, :2]}])
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] must be a tensor"):
        measure_sparsity(model, [{"x": TOKENS, "attention_mask": [[1, 1, 1], [1, 0, 0]]}])
    with pytest.raises(ValueError, match="saw no tokens"):
        measure_sparsity(model, [{"x": TOKENS, "attention_mask": torch.zeros(2, 3)}])
    assert not model.mlp.fc2._forward_pre_hooks

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no FFN found in Unknown"):
        measure_sparsity(Unknown(), [torch.randn(2, 4)])


def test_report_to_dict_is_json_and_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = relufy(create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2),
                                num_heads=(2, 4), window_size=4, num_classes=10))
    report = measure_sparsity(model, [torch.randn(2, 3, 32, 32)])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["average_sparsity"] == pytest.approx(report.average_sparsity)
    assert data["nonzero_percent"] == pytest.approx(report.nonzero_percent)
    assert [layer["name"] for layer in data["layers"]] == [ffn.name for ffn in find_ffns(model)]
    assert set(data["layers"][0]) == {"name", "hidden", "tokens", "mean_sparsity", "p10", "p50", "p90",
                                      "union_active_fraction", "samples"}
    path = tmp_path / "plots" / "sparsity.png"
    report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["sparsity.png"]  # no temp file left behind

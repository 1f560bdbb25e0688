"""SMoRA: its equivalences (zero B = base, k = r = LoRA, rank blocks = MoLoRA, gather = dense), routing and load
balancing, the API around it, on tiny self-defined modules, Hugging Face models and our backbones."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.adapters import SMoRAConfig, SMoRALinear, add_smora, disable_adapters, routing_report, smora_layers
from leanformer.adapters.layer import dense_adapter, gather_adapter
from leanformer.adapters.model import choose_compute, target_names
from leanformer.models import create_model


class TwoLayers(nn.Module):
    def __init__(self, d: int = 12, hidden: int = 20, classes: int = 3):
        super().__init__()
        self.fc1, self.fc2, self.classifier = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.classifier(self.fc2(F.relu(self.fc1(x))))


def _randomize_b(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in smora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def tiny_bert(classes: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60, num_labels=classes)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


# ---- equivalences ---------------------------------------------------------------------------------------------

def test_zero_b_gives_the_base_model_and_only_adapters_train():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(5, 12)
    base = model(x)
    add_smora(model, SMoRAConfig(r=8, active_r=2, modules_to_save=("classifier",)))
    torch.testing.assert_close(model(x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A.weight", "fc1.lora_B.weight", "fc1.lora_router.weight", "fc2.lora_A.weight",
                         "fc2.lora_B.weight", "fc2.lora_router.weight", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("compute", ["gather", "dense"])
def test_all_ranks_active_with_equal_gates_is_plain_lora(compute):
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(7, 12)
    add_smora(model, SMoRAConfig(r=6, active_r=6, lora_alpha=9, compute=compute))
    _randomize_b(model)
    for layer in smora_layers(model).values():
        nn.init.zeros_(layer.lora_router.weight)  # sigmoid(0) = 0.5 for every rank: equal gates, mean 1
    ours = model(x)

    def lora(layer: SMoRALinear, h):
        return layer.base_layer(h) + 9 / 6 * F.linear(F.linear(h, layer.lora_A.weight), layer.lora_B.weight)

    fc1, fc2 = model.fc1, model.fc2
    torch.testing.assert_close(ours, model.classifier(lora(fc2, F.relu(lora(fc1, x)))))


def test_all_ranks_active_equals_peft_lora_on_bert():
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    ids = torch.randint(0, 60, (2, 9))
    lora_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    add_smora(model, SMoRAConfig(r=4, active_r=4, lora_alpha=8, target_modules=("query", "value")))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in lora_model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    with torch.no_grad():
        for name, layer in smora_layers(model).items():
            layer.lora_A.weight.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B.weight.copy_(peft_layers[name].lora_B["default"].weight)
            layer.lora_router.weight.zero_()
    torch.testing.assert_close(model(input_ids=ids).logits, lora_model(input_ids=ids).logits)


def test_rank_blocks_are_molora_with_top1_routing():
    """rank_partition = 4, r = 16, active_r = 4: four experts of rank 4, one chosen per token, gate 1."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = SMoRALinear(base, SMoRAConfig(r=16, active_r=4, rank_partition=4, lora_alpha=8, compute="gather"))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(9, 10)
    expert = layer.lora_router(x).argmax(-1)  # sigmoid is monotonic, the bias is zero
    expected = torch.stack([
        base(x[t]) + 8 / 4 * layer.lora_B.weight[:, 4 * e: 4 * e + 4] @ (layer.lora_A.weight[4 * e: 4 * e + 4] @ x[t])
        for t, e in enumerate(expert.tolist())])
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank_partition", [1, 2])
def test_gather_and_dense_paths_give_the_same_outputs_and_gradients(rank_partition):
    torch.manual_seed(0)
    cfg = SMoRAConfig(r=8, active_r=4, rank_partition=rank_partition)
    layers = {path: SMoRALinear(nn.Linear(6, 5), cfg, compute=path) for path in ("gather", "dense")}
    layers["dense"].load_state_dict(layers["gather"].state_dict())
    for layer in layers.values():
        nn.init.normal_(layer.lora_B.weight, generator=torch.Generator().manual_seed(1))
        layer.eval()  # no balancing update between the two calls
    x = torch.randn(3, 4, 6)
    grads = {}
    for path, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[path] = [out, xi.grad] + [p.grad for p in (layer.lora_A.weight, layer.lora_B.weight,
                                                          layer.lora_router.weight)]
    for g, d in zip(grads["gather"], grads["dense"], strict=True):
        torch.testing.assert_close(g, d)


def test_adapter_functions_equal_the_formula():
    torch.manual_seed(0)
    x, a, b = torch.randn(5, 6), torch.randn(8, 6), torch.randn(4, 8)
    ranks = torch.rand(5, 8).topk(3, -1).indices
    gates = torch.rand(5, 3)
    expected = torch.stack([b[:, ranks[t]] @ (gates[t] * (a[ranks[t]] @ x[t])) for t in range(5)])
    torch.testing.assert_close(gather_adapter(x @ a.T, b, ranks, gates), expected)
    torch.testing.assert_close(dense_adapter(x @ a.T, b, ranks, gates), expected)


# ---- routing and balancing ------------------------------------------------------------------------------------

def _layer(**overrides) -> SMoRALinear:
    torch.manual_seed(0)
    return SMoRALinear(nn.Linear(6, 5), SMoRAConfig(**{"r": 8, "active_r": 2, **overrides}))


def test_gates_have_mean_one_and_unbiased_gates_ignore_the_balance_bias():
    layer = _layer(gate_scores="unbiased").eval()
    x = torch.randn(10, 6)
    layer.lora_biases.copy_(torch.linspace(0, 0.3, 8))
    ranks, gates = layer.route(layer.lora_router(x))
    torch.testing.assert_close(gates.mean(-1), torch.ones(10))
    scores = torch.sigmoid(layer.lora_router(x))
    selected = (scores + layer.lora_biases).topk(2, -1).indices
    assert torch.equal(ranks.sort(-1).values, selected.sort(-1).values)  # the bias selects...
    chosen = scores.gather(-1, ranks)
    torch.testing.assert_close(gates, chosen * 2 / chosen.sum(-1, keepdim=True))  # ...but does not gate
    layer.config = SMoRAConfig(r=8, active_r=2, gate_scores="biased")
    _, biased_gates = layer.route(layer.lora_router(x))
    chosen = (scores + layer.lora_biases).gather(-1, ranks)
    torch.testing.assert_close(biased_gates, chosen * 2 / chosen.sum(-1, keepdim=True))


def test_balance_bias_moves_by_u_against_the_load_in_training_only():
    layer = _layer(bias_update_rate=0.01)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
        layer.lora_router.weight[0, 0] = layer.lora_router.weight[1, 0] = 5.0  # experts 0 and 1 take every token
    x = torch.randn(16, 6).abs()
    layer.eval()
    layer(x)
    assert torch.equal(layer.lora_biases, torch.zeros(8))  # eval: no update
    layer.train()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.lora_biases, torch.zeros(8))  # no autograd (e.g. evaluation in train mode): no update
    layer(x)
    expected = torch.full((8,), 0.01)
    expected[:2] = -0.01
    torch.testing.assert_close(layer.lora_biases, expected)
    assert not layer.lora_biases.requires_grad and "lora_biases" in layer.state_dict()


def test_balancing_spreads_the_load_and_zero_rate_does_not():
    def max_violation(rate):
        layer = _layer(bias_update_rate=rate).train()
        with torch.no_grad():
            layer.lora_router.weight[:2] += 2.0  # positive inputs: experts 0 and 1 win every token at first
        x = torch.randn(256, 6).abs()
        for _ in range(300):
            layer(x)
        routing_report(layer, reset=True)
        layer.eval()
        layer(x)
        return routing_report(layer)[""]["max_violation"]

    unbalanced = max_violation(0.0)
    assert unbalanced == 3.0 and max_violation(1e-2) < 0.5


def test_padding_does_not_count_as_load():
    model = tiny_bert()
    add_smora(model, SMoRAConfig(r=4, active_r=1, target_modules=("query",)))
    ids = torch.randint(0, 60, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 3:] = 0
    model(input_ids=ids, attention_mask=mask)
    report = routing_report(model)
    assert {r["tokens"] for r in report.values()} == {11}
    model(input_ids=ids)  # no mask: every token counts
    assert {r["tokens"] for r in routing_report(model).values()} == {27}


def test_routing_report_counts_dead_experts_and_resets():
    layer = _layer(active_r=1)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
        layer.lora_router.weight[3, 0] = 5.0
    layer.eval()
    layer(torch.randn(10, 6).abs())
    report = routing_report(layer, reset=True)[""]
    assert report["tokens"] == 10 and report["dead_experts"] == 7 and report["load_share"][3] == 1.0
    assert math.isclose(report["max_violation"], 7.0)  # max load 10, mean 10/8
    assert routing_report(layer)[""]["tokens"] == 0


# ---- API ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "match"), [
    ("active_r", 9, "active_r=9: expected at most r=8"),
    ("r", 0, "r=0: expected a positive integer"),
    ("rank_partition", 3, "rank_partition=3: expected a divisor"),
    ("lora_dropout", 1.0, "lora_dropout=1.0"),
    ("gate_scores", "soft", "gate_scores='soft': expected one of unbiased, biased"),
    ("compute", "fast", "compute='fast'"),
    ("bias_update_rate", -1e-3, "bias_update_rate=-0.001"),
    ("target_modules", (), "target_modules=()"),
    ("target_modules", [3], "expected module names"),
])
def test_bad_configs_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SMoRAConfig(**{"r": 8, "active_r": 2, field: value})


def test_targets_all_linear_names_and_regex():
    model = tiny_bert()
    names = target_names(model, SMoRAConfig())
    assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    assert target_names(model, SMoRAConfig(target_modules=("query", "value"))) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert target_names(model, SMoRAConfig(target_modules=r".*layer\.1\..*dense")) == [
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        add_smora(model, SMoRAConfig(target_modules=("nothing",)))
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\]"):
        add_smora(model, SMoRAConfig(modules_to_save=("head",)))
    add_smora(model, SMoRAConfig(r=4, active_r=2))
    with pytest.raises(ValueError, match="already has SMoRA adapters"):
        add_smora(model, SMoRAConfig(r=4, active_r=2))


def test_disable_adapters_runs_the_base_model_and_merge_is_refused():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(4, 12)
    base = model(x)
    add_smora(model, SMoRAConfig(r=4, active_r=2))
    _randomize_b(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    torch.testing.assert_close(model(x), adapted)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        model.fc1.merge()
    with pytest.raises(ValueError, match="no SMoRA adapters"), disable_adapters(TwoLayers()):
        pass


@pytest.mark.parametrize("build", ["swin", "msmlp"])
def test_our_backbones_train_with_smora(build):
    torch.manual_seed(0)
    if build == "swin":
        model = create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2),
                             num_heads=(2, 4), window_size=4, num_classes=10)
    else:
        model = create_model("msmlp_tiny", img_size=32, embed_dim=20, depths=(1, 1),
                             mix_size=[[1, 1, 3, 5, 7], [1, 3, 3, 5, 7]], num_classes=10)
    add_smora(model, SMoRAConfig(r=8, active_r=2, modules_to_save=("head",)))
    assert smora_layers(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(layer.lora_A.weight.grad is not None for layer in smora_layers(model).values())


def test_auto_compute_picks_a_measured_path():
    assert choose_compute(16, SMoRAConfig(r=8, active_r=2), tokens=64, runs=1) in ("gather", "dense")
    model = add_smora(TwoLayers(), SMoRAConfig(r=8, active_r=2, compute="auto"))
    assert {layer.compute for layer in smora_layers(model).values()} <= {"gather", "dense"}


def test_llama_all_linear_leaves_the_lm_head_and_trains():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (2, 6))
    add_smora(model, SMoRAConfig(r=8, active_r=2))
    names = set(smora_layers(model))
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    _randomize_b(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(layer.lora_router.weight.grad is not None for layer in smora_layers(model).values())
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None

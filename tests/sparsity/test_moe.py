"""Fused mixture-of-experts FFNs (issue 13): transformers 5's MixtralExperts and kin hold their experts as 3-D
parameters; find_ffns gives one record per experts module, measure_sparsity and the regulariser see x1 = act(gate)
* up of every (token, chosen expert) pair, relufy/apply_topk change act_fn, saving round-trips, and sparse
inference refuses them by name. The references are computed by hand from the parameters and the router."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.sparsity import (
    FATReLU,
    FFNSpec,
    ProSparseConfig,
    ProSparseSchedule,
    ReLUConfig,
    SparseInferenceConfig,
    SparsityRegularizer,
    TopK,
    TopKConfig,
    apply_topk,
    find_ffns,
    load_pretrained,
    measure_sparsity,
    prosparse,
    record_ffn_activity,
    relufy,
    save_pretrained,
    sparsify_for_inference,
)

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 64, 32, 64, 4, 2
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # the second sample ends in three padding tokens


def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return transformers.MixtralForCausalLM(config).eval()


def _moe_inputs(model: nn.Module, **kwargs) -> list[torch.Tensor]:
    """The hidden states (tokens, H) entering each layer's sparse MoE block in one forward."""
    seen = []
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, HIDDEN)))
               for layer in model.model.layers]
    try:
        model(IDS, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _reference_x1(block: nn.Module, hidden: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: the router's top-k experts of each token, and act(gate) * up of each (token, expert) pair, with
    the pair's token index."""
    chosen = (hidden @ block.gate.weight.t()).topk(TOP_K, dim=-1).indices
    gate_up = block.experts.gate_up_proj
    rows, tokens = [], []
    for token in range(hidden.shape[0]):
        for expert in chosen[token].tolist():
            gate = hidden[token] @ gate_up[expert, :INTERMEDIATE].t()
            up = hidden[token] @ gate_up[expert, INTERMEDIATE:].t()
            rows.append(act(gate) * up)
            tokens.append(token)
    return torch.stack(rows), torch.tensor(tokens)


def _zero_fractions(model: nn.Module, keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the zero fraction of each kept (token, expert) pair of relu(gate) * up, by hand."""
    fractions = []
    with torch.no_grad():
        for layer, hidden in zip(model.model.layers, _moe_inputs(model), strict=True):
            x1, tokens = _reference_x1(layer.mlp, hidden, torch.relu)
            if keep is not None:
                x1 = x1[keep.reshape(-1)[tokens].bool()]
            fractions.append((x1 == 0).double().mean(-1))
    return fractions


def test_find_ffns_gives_one_gated_record_per_experts_module():
    model = _mixtral()
    ffns = find_ffns(model)
    assert [ffn.name for ffn in ffns] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for ffn, layer in zip(ffns, model.model.layers, strict=True):
        assert ffn.fused_experts and ffn.gated and ffn.module is layer.mlp.experts and ffn.act_attr == "act_fn"
        assert (ffn.num_experts, ffn.in_features, ffn.hidden_features, ffn.out_features) == \
            (EXPERTS, HIDDEN, INTERMEDIATE, HIDDEN)
        gate_up = layer.mlp.experts.gate_up_proj
        assert torch.equal(ffn.weight("gate"), gate_up[:, :INTERMEDIATE])  # gate first, as the forward chunks
        assert torch.equal(ffn.weight("up"), gate_up[:, INTERMEDIATE:])
        assert ffn.weight("down") is layer.mlp.experts.down_proj


def test_measure_counts_every_routed_pair_as_by_hand():
    model = relufy(_mixtral())
    report = measure_sparsity(model, [IDS])
    for layer, fractions in zip(report.layers, _zero_fractions(model), strict=True):
        assert layer.tokens == IDS.numel() * TOP_K and layer.hidden == INTERMEDIATE
        assert layer.mean_sparsity == pytest.approx(float(fractions.mean()), abs=1e-12)
        assert layer.p50 == pytest.approx(float(fractions.quantile(0.5)), abs=1e-12)
        assert layer.union_active_fraction is None  # pairs have no sequence to take a union over
    assert 0.3 < report.average_sparsity < 0.7  # ReLU of a random gate: about half


def test_measure_leaves_out_the_pairs_of_padding_tokens():
    model = relufy(_mixtral())
    report = measure_sparsity(model, [{"input_ids": IDS, "attention_mask": MASK}])
    for layer, fractions in zip(report.layers, _zero_fractions(model, keep=MASK), strict=True):
        assert layer.tokens == int(MASK.sum()) * TOP_K
        assert layer.mean_sparsity == pytest.approx(float(fractions.mean()), abs=1e-12)


def test_a_mask_of_other_tokens_is_refused():
    model = relufy(_mixtral())
    forward = model.forward
    model.forward = lambda input_ids, attention_mask=None: forward(input_ids)  # runs on all of IDS, whatever the mask
    with pytest.raises(ValueError, match=r"experts: attention mask of shape \(2, 3\) does not match the 14 tokens"):
        measure_sparsity(model, [{"input_ids": IDS, "attention_mask": MASK[:, :3]}])


def test_relufy_replaces_every_experts_act_fn_and_changes_the_outputs():
    model = _mixtral()
    with torch.no_grad():
        before = model(IDS).logits
        relufy(model)
        after = model(IDS).logits
    assert all(type(layer.mlp.experts.act_fn) is nn.ReLU for layer in model.model.layers)
    assert not torch.allclose(before, after)


def test_topk_keeps_at_most_k_units_of_every_pair():
    model = apply_topk(relufy(_mixtral()), TopKConfig(8))
    assert all(isinstance(layer.mlp.experts.act_fn[1], TopK) for layer in model.model.layers)
    report = measure_sparsity(model, [IDS])
    assert all(layer.p10 >= 1 - 8 / INTERMEDIATE for layer in report.layers)


def test_the_regularizer_sums_the_l1_of_the_routed_pairs_as_by_hand():
    model = relufy(_mixtral()).train()
    reference = [x1.abs().mean() for x1, _ in
                 (_reference_x1(layer.mlp, hidden, torch.relu)
                  for layer, hidden in zip(model.model.layers, _moe_inputs(model), strict=True))]
    with SparsityRegularizer(model, ProSparseSchedule.constant(1.0, 10)) as reg:
        model(IDS)
        loss = reg.loss(0)
    torch.testing.assert_close(loss, sum(reference))
    loss.backward()
    assert all(layer.mlp.experts.gate_up_proj.grad.abs().sum() > 0 for layer in model.model.layers)


def test_the_regularizer_leaves_out_padding_pairs():
    model = relufy(_mixtral()).train()
    keep = MASK.reshape(-1).bool()
    reference = []
    for layer, hidden in zip(model.model.layers, _moe_inputs(model), strict=True):
        x1, tokens = _reference_x1(layer.mlp, hidden, torch.relu)
        reference.append(x1[keep[tokens]].abs().mean())
    with SparsityRegularizer(model, ProSparseSchedule.constant(1.0, 10)) as reg, reg.attention_mask(MASK):
        model(IDS)
        loss = reg.loss(0)
    torch.testing.assert_close(loss, sum(reference))


def test_prosparse_runs_three_steps_with_the_default_loss():
    model = _mixtral()
    gen = torch.Generator().manual_seed(0)
    batches = [(ids[:, :-1], ids[:, 1:]) for ids in (torch.randint(0, VOCAB, (2, 9), generator=gen)
                                                     for _ in range(3))]
    config = ProSparseConfig(steps=3, relu_steps=1, stages=((2, 0.1),), lr=1e-3, eval_every=3, batch_size=2,
                             seq_len=8, threshold=0.01)
    result = prosparse(model, batches, config, batches[:1], progress=False)
    assert torch.isfinite(torch.tensor(result.final_val_loss)) and result.final_sparsity > 0.3
    assert all(isinstance(layer.mlp.experts.act_fn, FATReLU) for layer in model.model.layers)


def test_a_relufied_mixtral_round_trips_and_reloads_plainly(tmp_path):
    model = relufy(_mixtral())
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        expected = model(IDS).logits
        torch.testing.assert_close(load_pretrained(tmp_path).eval()(IDS).logits, expected, rtol=0, atol=0)
        plain = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=0, atol=0)


def test_a_fatrelu_mixtral_round_trips_and_a_plain_reload_fails(tmp_path):
    model = relufy(_mixtral(), ReLUConfig("fatrelu", 0.01))
    save_pretrained(model, tmp_path)
    reloaded = load_pretrained(tmp_path).eval()
    assert all(layer.mlp.experts.act_fn.threshold == 0.01 for layer in reloaded.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    with pytest.raises(KeyError, match="fatrelu FFNs set by leanformer"):
        transformers.MixtralForCausalLM.from_pretrained(tmp_path)


def test_sparse_inference_and_predictors_refuse_fused_experts_by_name():
    model = relufy(_mixtral())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts is a MixtralExperts: sparsify_for_inference "
                                         r"does not support fused mixture-of-experts weights \(exact sparse inference"):
        sparsify_for_inference(model, SparseInferenceConfig())
    with pytest.raises(ValueError, match=r"record_ffn_activity does not support fused mixture-of-experts weights"):
        record_ffn_activity(model, [IDS])


def test_an_experts_implementation_that_bypasses_act_fn_is_refused():
    model = _mixtral()
    model.config._experts_implementation = "sonicmoe"  # runs a fixed activation in a kernel, never act_fn
    with pytest.raises(ValueError, match=r"experts implementation 'sonicmoe' does not call the module's act_fn"):
        find_ffns(model)


@pytest.mark.parametrize("config_name, model_name, extra, per_layer", [
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=EXPERTS, moe_intermediate_size=INTERMEDIATE,
                                                   shared_expert_intermediate_size=INTERMEDIATE), 2),
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=EXPERTS, moe_intermediate_size=INTERMEDIATE,
                                                   head_dim=16), 1),
    ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=EXPERTS), 1),
])
def test_other_fused_experts_families_are_measured_pair_by_pair(config_name, model_name, extra, per_layer):
    config = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                num_experts_per_tok=TOP_K, **extra)
    model = relufy(getattr(transformers, model_name)(config).eval())
    ffns = find_ffns(model)
    experts = [ffn for ffn in ffns if ffn.fused_experts]
    assert len(ffns) == 2 * per_layer and len(experts) == 2  # Qwen2-MoE adds a shared expert (a LLaMA-style MLP)
    report = measure_sparsity(model, [{"input_ids": IDS, "attention_mask": MASK}])
    by_name = {layer.name: layer for layer in report.layers}
    assert all(by_name[ffn.name].tokens == int(MASK.sum()) * TOP_K for ffn in experts)


def test_x1_follows_the_model_under_eager_and_batched_experts():
    reference = measure_sparsity(relufy(_mixtral()), [IDS]).to_dict()
    for implementation in ("eager", "batched_mm"):
        model = relufy(_mixtral())
        model.set_experts_implementation(implementation)
        assert measure_sparsity(model, [IDS]).to_dict() == reference
    model = relufy(_mixtral())
    x1 = []
    handle = find_ffns(model)[0].hook_x1(lambda _m, t, rows: x1.append((t, rows)))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    (t, rows), = x1
    assert rows.tokens == IDS.numel() and t.shape == (IDS.numel() * TOP_K, INTERMEDIATE)
    assert torch.equal(torch.bincount(rows.index), torch.full((IDS.numel(),), TOP_K))
    with torch.no_grad():
        hidden = _moe_inputs(model)[0]
    expected, tokens = _reference_x1(model.model.layers[0].mlp, hidden, F.relu)
    # the same (token, x1) rows as by hand, whatever the order
    for (tok_a, a), (tok_b, b) in zip(_by_token(rows.index, t), _by_token(tokens, expected), strict=True):
        assert tok_a == tok_b
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))


def _by_token(tokens: torch.Tensor, x1: torch.Tensor) -> list[tuple[int, list[float]]]:
    """Rows of x1 with their token, in one order whatever order they came in."""
    return sorted(zip(tokens.tolist(), x1.tolist(), strict=True))


def test_an_experts_spec_is_validated_and_usable_as_specs():
    with pytest.raises(ValueError, match=r"experts=True needs fused_gate='first'"):
        FFNSpec(("MyExperts",), up="w13", down="w2", act="act", experts=True)
    spec = FFNSpec(("MixtralExperts",), up="gate_up_proj", down="down_proj", act="act_fn", fused_gate="first",
                   experts=True)
    ffns = find_ffns(_mixtral(), [spec])
    assert [ffn.found_by for ffn in ffns] == ["specs", "specs"] and all(ffn.fused_experts for ffn in ffns)
    with pytest.raises(ValueError, match=r"mlp\.gate\.weight \(down\) is not a 3-D \(experts, out, in\) parameter"):
        find_ffns(_mixtral(), [FFNSpec(("MixtralSparseMoeBlock",), up="experts.gate_up_proj", down="gate.weight",
                                       act="experts", fused_gate="first", experts=True)])

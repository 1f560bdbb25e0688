"""ProSparse schedule values and the sparsity regulariser's loss, gradient, hooks and effect on training."""

from __future__ import annotations

import copy
import math
from itertools import pairwise

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.regularize import (
    PROSPARSE_7B,
    PROSPARSE_13B,
    ProSparseSchedule,
    SparsityRegularizer,
)

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                      hidden_act="relu")
    return transformers.LlamaForCausalLM(config)


def tokens(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def capture_mlp_inputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Forward hooks recording each LlamaMLP's input, to recompute x1 by hand."""
    inputs: list[torch.Tensor] = []
    handles = [ffn.module.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
               for ffn in find_ffns(model)]
    return inputs, handles


def x1_by_hand(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.relu(ffn.gate(x)) * ffn.up(x) for ffn, x in zip(find_ffns(model), inputs, strict=True)]


# ---------------------------------------------------------------- schedule


def test_prosparse_7b_values():
    s = ProSparseSchedule(PROSPARSE_7B)
    assert s(5500) == pytest.approx(5e-3)
    assert s(8000) == pytest.approx(0.0275)
    assert s(11000) == pytest.approx(0.05)
    assert s(14000) == pytest.approx(0.125)
    assert s.value(8000) == s(8000)
    assert s.total_steps == 16500 and s.final_value == pytest.approx(0.2)


def test_leading_zero_stage_then_flat_warmup():
    s = ProSparseSchedule(PROSPARSE_7B)
    assert all(s(t) == 0.0 for t in (0, 1, 2500, 4999))
    assert all(s(t) == pytest.approx(5e-3) for t in (5000, 5001, 5999))
    s13 = ProSparseSchedule(PROSPARSE_13B)
    assert s13(5499) == 0.0 and s13(5500) == pytest.approx(5e-3) and s13(6749) == pytest.approx(5e-3)
    assert s13(8750) == pytest.approx(7.5e-3)  # half-way up the 6750-10750 rise from 5e-3 to 1e-2


def test_first_stage_is_flat_warmup_at_its_lambda():
    s = ProSparseSchedule(((100, 0.01), (200, 0.03)))
    assert s(0) == s(50) == s(99) == pytest.approx(0.01)
    assert s(150) == pytest.approx(0.02)


def test_equal_peaks_hold_and_value_after_the_end():
    s = ProSparseSchedule(PROSPARSE_7B)
    assert all(s(t) == pytest.approx(0.05) for t in range(10000, 12000, 97))
    assert all(s(t) == pytest.approx(0.2) for t in range(16000, 16500, 37))
    assert s(16500) == s(10**7) == pytest.approx(0.2)


@pytest.mark.parametrize("stages", [PROSPARSE_7B, PROSPARSE_13B])
def test_continuous_after_warmup_and_monotone(stages):
    s = ProSparseSchedule(stages)
    values = [s(t) for t in range(s.total_steps + 10)]
    diffs = [b - a for a, b in pairwise(values)]
    assert min(diffs) >= 0
    warmup_start, warmup_lambda = stages[0][0], stages[1][1]
    assert diffs[warmup_start - 1] == pytest.approx(warmup_lambda)  # the only jump: 0 -> warmup value
    # elsewhere one step moves λ by at most the steepest sine slope, π/2 · Δλ / ΔT
    slope = max(math.pi / 2 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in pairwise(stages))
    assert max(d for t, d in enumerate(diffs) if t != warmup_start - 1) <= slope * (1 + 1e-9)
    for end, lam in stages[2:]:  # each rise ends on its λ, continuously
        assert s(end) == pytest.approx(lam) and s(end - 1e-6) == pytest.approx(lam)


def test_constant_schedule():
    s = ProSparseSchedule.constant(0.1, 1000)
    assert s(0) == s(999) == s(5000) == pytest.approx(0.1)
    assert s.total_steps == 1000


def test_scaled():
    s = ProSparseSchedule(PROSPARSE_7B).scaled(1650)
    assert [end for end, _ in s.stages] == [500, 600, 1000, 1200, 1600, 1650]
    assert [lam for _, lam in s.stages] == [lam for _, lam in PROSPARSE_7B]
    assert s(550) == pytest.approx(5e-3) and s(800) == pytest.approx(0.0275) and s(1400) == pytest.approx(0.125)
    short = ProSparseSchedule(PROSPARSE_7B).scaled(50)
    assert short.total_steps == 50 and short(49) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="too few"):
        ProSparseSchedule(PROSPARSE_7B).scaled(10)
    with pytest.raises(ValueError, match="steps"):
        ProSparseSchedule(PROSPARSE_7B).scaled(0)


@pytest.mark.parametrize("stages, match", [
    ((), "stages must not be empty"),
    (((100, 0.1), (100, 0.2)), r"stages\[1\] end step"),
    (((100, 0.1), (50, 0.2)), r"stages\[1\] end step"),
    (((0, 0.1),), r"stages\[0\] end step"),
    (((100, -0.1),), r"stages\[0\] lambda"),
    (((100, float("nan")),), r"stages\[0\] lambda"),
    (((100.0, 0.1),), r"stages\[0\] end step must be an int"),
    (((True, 0.1),), r"stages\[0\] end step must be an int"),
    (((100, 0.1, 3),), r"stages\[0\] must be an \(end_step, lambda\) pair"),
    (5, "stages must be a sequence"),
])
def test_schedule_validation(stages, match):
    with pytest.raises(ValueError, match=match):
        ProSparseSchedule(stages)


def test_schedule_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        ProSparseSchedule(PROSPARSE_7B)(-1)


# ---------------------------------------------------------------- regulariser


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_loss_and_gradient_match_hand_computation(normalization):
    model = tiny_llama().train()
    schedule = ProSparseSchedule.constant(0.3, 10)
    reg = SparsityRegularizer(model, schedule, normalization=normalization)
    inputs, handles = capture_mlp_inputs(model)
    model(tokens())
    for h in handles:
        h.remove()
    x1s = x1_by_hand(model, inputs)
    reduce = torch.mean if normalization == "mean" else torch.sum
    expected = 0.3 * sum(reduce(x1.abs()) for x1 in x1s)
    loss = reg.loss(step=3)
    assert reg.current_lambda == pytest.approx(0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)

    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    assert sum(g is not None for g in got) > 0
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    reg.remove()


def test_loss_resets_and_sums_forwards():
    model = tiny_llama().train()
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(1.0, 10))
    model(tokens(seed=1))
    first = reg.loss(0).detach()
    model(tokens(seed=1))
    model(tokens(seed=2))
    both = reg.loss(0).detach()
    model(tokens(seed=2))
    second = reg.loss(0).detach()
    torch.testing.assert_close(both, first + second)
    assert reg.loss(0).item() == 0.0  # nothing counted since the last call


def test_attention_mask_counts_only_valid_tokens():
    model = tiny_llama().train()
    ids = tokens(batch=2, length=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(0.5, 10))
    inputs, handles = capture_mlp_inputs(model)
    with reg.attention_mask(mask):
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.bool()
    expected = 0.5 * sum(x1[valid].abs().mean() for x1 in x1_by_hand(model, inputs))
    torch.testing.assert_close(reg.loss(0), expected, rtol=1e-5, atol=0)
    with reg.attention_mask(torch.ones(5, 5)), pytest.raises(ValueError, match="attention mask of shape"):
        model(ids)
    reg.reset()


def test_last_sparsity_is_zero_fraction_of_x1():
    model = tiny_llama().train()
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(0.1, 10))
    assert reg.last_sparsity is None
    inputs, handles = capture_mlp_inputs(model)
    model(tokens())
    for h in handles:
        h.remove()
    with torch.no_grad():
        expected = sum((x1 == 0).float().mean().item() for x1 in x1_by_hand(model, inputs)) / len(inputs)
    assert 0.2 < expected < 0.8
    assert reg.last_sparsity == pytest.approx(expected, abs=1e-6)
    reg.reset()


def test_idle_in_eval_mode_and_without_grad():
    model = tiny_llama()
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(0.1, 10))
    model.eval()
    model(tokens())
    model.train()
    with torch.no_grad():
        model(tokens())
    loss = reg.loss(0)
    assert loss.item() == 0.0 and not loss.requires_grad
    assert reg.last_sparsity is None


def test_zero_lambda_gives_a_zero_tensor_without_graph():
    model = tiny_llama().train()
    reg = SparsityRegularizer(model, PROSPARSE_7B)
    model(tokens())
    loss = reg.loss(step=100)
    assert loss.shape == () and loss.item() == 0.0 and not loss.requires_grad
    assert reg.current_lambda == 0.0
    assert reg.loss(step=8000).item() == 0.0  # the sum (and its graph) was dropped by the first call


def test_remove_and_context_manager_take_hooks_off():
    model = tiny_llama().train()
    downs = [ffn.down for ffn in find_ffns(model)]
    with SparsityRegularizer(model, ProSparseSchedule.constant(0.1, 10)) as reg:
        assert all(len(d._forward_pre_hooks) == 1 for d in downs)
    assert all(len(d._forward_pre_hooks) == 0 for d in downs)
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(0.1, 10))
    reg.remove()
    reg.remove()  # idempotent
    assert all(len(d._forward_pre_hooks) == 0 for d in downs)
    model(tokens())
    assert reg.loss(0).item() == 0.0


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(storages.values())


def test_keeps_no_extra_activation_tensors():
    model = tiny_llama().train()
    ids = tokens(batch=4, length=16)
    base = _saved_bytes(model, ids)
    reg = SparsityRegularizer(model, ProSparseSchedule.constant(0.1, 10))
    with_reg = _saved_bytes(model, ids)
    reg.reset()
    reg.remove()
    # x1 is 4·16·64 floats = 16 KiB per layer; the regulariser may add only a few scalars
    assert with_reg - base <= 64


def test_training_with_regulariser_increases_sparsity():
    torch.manual_seed(0)
    base = tiny_llama()
    data = [tokens(batch=8, length=16, seed=s) for s in range(4)]
    held_out = tokens(batch=8, length=16, seed=99)

    def train(regularize: bool) -> float:
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        # |x1| is ~1e-3 at HF's init (weights std 0.02), hence the large λ
        schedule = ProSparseSchedule(((10, 0.0), (20, 5.0), (50, 50.0)))
        reg = SparsityRegularizer(model, schedule) if regularize else None
        for step in range(50):
            ids = data[step % len(data)]
            loss = model(ids, labels=ids).loss
            if reg is not None:
                loss = loss + reg.loss(step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if reg is not None:
            reg.remove()
        model.eval()
        inputs, handles = capture_mlp_inputs(model)
        with torch.no_grad():
            model(held_out)
            x1s = x1_by_hand(model, inputs)
        for h in handles:
            h.remove()
        return sum((x1 == 0).float().mean().item() for x1 in x1s) / len(x1s)

    plain, regularized = train(False), train(True)
    assert regularized > plain + 0.2, (plain, regularized)


def test_unsupported_model_names_its_class():
    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="TinyNet"):
        SparsityRegularizer(TinyNet(), ProSparseSchedule.constant(0.1, 10))


def test_bad_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        SparsityRegularizer(tiny_llama(), ProSparseSchedule.constant(0.1, 10), normalization="max")

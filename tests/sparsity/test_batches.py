"""One batch convention for measure_sparsity, the predictors and prosparse: a dict is keyword arguments, a tensor
the one positional argument, an (inputs, targets) pair runs the model on its inputs and keeps the targets away."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from leanformer.sparsity._batches import split_batch, split_pair
from leanformer.sparsity.activations import relufy
from leanformer.sparsity.measure import measure_sparsity
from leanformer.sparsity.predictor import evaluate_predictors, record_ffn_activity, train_predictors
from leanformer.sparsity.prosparse_training import ProSparseConfig, prosparse

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=VOCAB)
    return relufy(transformers.LlamaForCausalLM(config).eval())


def lm_pairs(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, next-token targets) with many zero targets, which as an attention mask would hide tokens."""
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (2, 9), generator=generator) for _ in range(n)]
    return [(t[:, :-1], t[:, 1:] * (t[:, 1:] % 2)) for t in tokens]


def spy(model: nn.Module) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every call of ``model``, recorded by a forward pre-hook."""
    calls = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
    return calls


# --- the convention itself -----------------------------------------------------------------------------------------


def test_each_batch_kind_is_split_as_meant():
    x, y = torch.randn(2, 3), torch.tensor([1, 0])
    assert split_batch(x).args[0] is x and split_batch(x).kwargs == {} and split_batch(x).targets is None
    call = split_batch({"input_ids": x, "labels": y})
    assert call.args == () and call.kwargs == {"input_ids": x, "labels": y} and call.targets is None
    for pair in ((x, y), [x, y]):
        call = split_batch(pair)
        assert call.args[0] is x and call.kwargs == {} and call.targets is y
    call = split_batch(({"input_ids": x, "attention_mask": y}, y))
    assert call.args == () and set(call.kwargs) == {"input_ids", "attention_mask"} and call.targets is y
    assert split_batch((x,)).args[0] is x and split_batch((x,)).targets is None
    assert split_pair((x, y)) == (x, y)


@pytest.mark.parametrize(("batch", "expected"), [
    ("text", "each batch must be a tensor, a tuple/list .* got str"),
    ((torch.zeros(1), torch.zeros(1), torch.zeros(1)), r"\(inputs, targets\) or \(inputs,\), got 3 items"),
    (([1, 2], torch.zeros(1)), "the inputs of an .* must be a tensor or a dict of keyword arguments, got list"),
])
def test_other_batches_are_refused(batch, expected):
    with pytest.raises(ValueError, match=expected):
        split_batch(batch)


@pytest.mark.parametrize("batch", [torch.zeros(2, 3), {"input_ids": torch.zeros(2, 3)}, (torch.zeros(2, 3),),
                                   (torch.zeros(2, 3), [1, 0])])
def test_prosparse_batches_need_tensor_targets(batch):
    with pytest.raises(ValueError, match=r"each batch must be an \(inputs, targets\) pair"):
        split_pair(batch)


# --- every entry point follows it ----------------------------------------------------------------------------------


def test_measure_sparsity_on_pairs_runs_the_inputs_alone():
    model, pairs = tiny_llama(), lm_pairs()
    calls = spy(model)
    on_pairs = measure_sparsity(model, pairs)
    assert all(len(args) == 1 and "attention_mask" not in kwargs for args, kwargs in calls)
    assert all(torch.equal(args[0], inputs) for (args, _), (inputs, _) in zip(calls, pairs, strict=True))
    assert on_pairs.to_dict() == measure_sparsity(model, [inputs for inputs, _ in pairs]).to_dict()


def test_measure_sparsity_on_pairs_of_keyword_inputs_keeps_their_padding_mask():
    model, pairs = tiny_llama(), lm_pairs()
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    dicts = [{"input_ids": inputs, "attention_mask": mask} for inputs, _ in pairs]
    on_pairs = measure_sparsity(model, [(d, targets) for d, (_, targets) in zip(dicts, pairs, strict=True)])
    assert on_pairs.to_dict() == measure_sparsity(model, dicts).to_dict()
    assert all(layer.tokens == 13 * len(pairs) for layer in on_pairs.layers)


def test_predictors_record_and_evaluate_pairs_as_their_inputs():
    model, pairs = tiny_llama(), lm_pairs()
    inputs = [x for x, _ in pairs]
    calls = spy(model)
    recorded = record_ffn_activity(model, pairs, max_tokens=1000)
    assert all(len(args) == 1 and not kwargs for args, kwargs in calls)
    for name, (x, active) in record_ffn_activity(model, inputs, max_tokens=1000).items():
        assert torch.equal(recorded[name][0], x) and torch.equal(recorded[name][1], active)
    predictors, _ = train_predictors(model, pairs, progress=False)
    assert evaluate_predictors(model, predictors, pairs) == evaluate_predictors(model, predictors, inputs)


def test_prosparse_takes_pairs_of_keyword_inputs():
    model, pairs = tiny_llama(), lm_pairs(4)
    keyword_pairs = [({"input_ids": x, "attention_mask": torch.ones_like(x)}, y) for x, y in pairs]

    def loss_fn(model, batch):
        inputs, targets = batch
        logits = model(**inputs, use_cache=False).logits
        return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())

    config = ProSparseConfig(steps=2, relu_steps=1, stages=((1, 0.1),), eval_every=2, lr=1e-3)
    result = prosparse(model, keyword_pairs[:2], config, keyword_pairs[2:], progress=False, loss_fn=loss_fn)
    assert result.report.layers[0].tokens == 2 * 2 * 8
    with pytest.raises(ValueError, match=r"each batch must be an \(inputs, targets\) pair"):
        prosparse(tiny_llama(), [x for x, _ in pairs], config, pairs, progress=False)

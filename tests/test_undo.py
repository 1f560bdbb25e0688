"""Every transform has its undo, and the model is the original afterwards: the same modules, weights, trainable
parameters, hooks and outputs, on the model families users bring (Hugging Face LLaMA and BERT, timm, ours)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from tests.sparsity.test_activations import FAMILIES

from leanformer import (
    CompressionConfig,
    ReLUConfig,
    SMoRAConfig,
    SparseInferenceConfig,
    TopKConfig,
    add_smora,
    apply_topk,
    compress_activations,
    decompress_activations,
    desparsify,
    relufy,
    remove_smora,
    restore_activations,
    sparsify_for_inference,
)
from leanformer.sparsity import (
    LowRankPredictor,
    ThresholdConfig,
    calibrate_thresholds,
    find_ffns,
    inference_report,
    remove_thresholds,
)


def run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def hooks(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_pre_hooks) + len(m._forward_hooks) for name, m in model.named_modules()}


def snapshot(model: nn.Module, inputs) -> dict:
    """What "the same model" means here."""
    model.eval()
    return {"modules": repr(model), "state": {k: v.clone() for k, v in model.state_dict().items()},
            "trainable": {k: p.requires_grad for k, p in model.named_parameters()}, "hooks": hooks(model),
            "attributes": sorted(vars(model)),
            "config": model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict")
            else None, "output": run(model, inputs)}


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["trainable"] == before["trainable"] and after["hooks"] == before["hooks"]
    assert after["attributes"] == before["attributes"]
    assert after["config"] == before["config"]
    torch.testing.assert_close(after["output"], before["output"], rtol=0, atol=0)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, inputs = FAMILIES[request.param][0]()
    return model.eval(), inputs


# transform -> (prepare: what the transform needs first, apply, undo, the undo's error when there is nothing to undo)
TRANSFORMS = {
    "relufy+apply_topk": (None, lambda m: apply_topk(relufy(m, ReLUConfig("fatrelu", 0.01)), TopKConfig(4)),
                          restore_activations, "no activation to restore"),
    "sparsify_for_inference": (relufy, lambda m: sparsify_for_inference(m, SparseInferenceConfig(max_active=1.0)),
                               desparsify, "no sparse-inference modules"),
    "add_smora": (None, lambda m: add_smora(m, SMoRAConfig(r=8, active_r=2, target_modules="all-linear",
                                                             compute="gather")), remove_smora, "no SMoRA adapters"),
    "compress_activations": (None, lambda m: compress_activations(m, CompressionConfig(bits=4)),
                             decompress_activations, "not compressed"),
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_the_undo_gives_back_the_original_model(family, transform):
    prepare, apply, undo, nothing_to_undo = TRANSFORMS[transform]
    model, inputs = family
    if prepare is not None:
        prepare(model)
    before = snapshot(model, inputs)
    apply(model)
    changed = snapshot(model, inputs)
    assert any(changed[key] != before[key] for key in ("modules", "trainable", "hooks", "attributes"))
    assert_same(before, snapshot(undo(model), inputs))
    assert all(p.is_contiguous() for p in model.parameters())
    with pytest.raises(ValueError, match=nothing_to_undo):
        undo(model)


def test_desparsify_of_a_copy_leaves_the_original_working():
    """Predictor mode hooks the root model (positions); undoing a copy removes the copy's hooks only."""
    torch.manual_seed(0)
    model, inputs = FAMILIES["hf_llama"][0]()
    relufy(model.eval())
    before = snapshot(model, inputs)
    predictors = {ffn.name: LowRankPredictor(32, 64, 4) for ffn in find_ffns(model)}
    sparsify_for_inference(model, SparseInferenceConfig("predictor", max_active=1.0), predictors)
    expected = run(model, inputs)
    twin = desparsify(copy.deepcopy(model))
    assert not inference_report(twin)
    assert_same(before, snapshot(twin, inputs))  # the copy's position hooks are gone
    inference_report(model, reset=True)
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)
    assert inference_report(model)["model.layers.0.mlp"]["calls"]["dense"] == 1  # its first position: still exact


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_remove_thresholds_undoes_calibrate_thresholds(method):
    """TEAL (input thresholds on every Linear of the blocks) and CATS (FFN activation magnitudes), on LLaMA."""
    torch.manual_seed(0)
    model, inputs = FAMILIES["hf_llama"][0]()
    model.eval()
    before = snapshot(model, inputs)
    ids = inputs["input_ids"]
    calibrate_thresholds(model, [(ids[:, :-1], ids[:, 1:])], ThresholdConfig(method=method, sparsity=0.4,
                                                                             allocation="uniform"))
    assert snapshot(model, inputs)["modules"] != before["modules"]
    assert_same(before, snapshot(remove_thresholds(model), inputs))
    with pytest.raises(ValueError, match="no TEAL/CATS thresholds"):
        remove_thresholds(model)


"""SMoRA under gradient checkpointing: the recomputed forward must route exactly as the original did, so gradients,
routed-token counts and the balance bias after a step equal those of the same step without checkpointing."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

from leanformer.adapters import SMoRAConfig, add_smora, disable_adapters, routing_report, smora_layers
from leanformer.models import create_model

RATE = 0.05  # a large balance step: routing after one forward differs visibly from routing before it


def _config(compute: str, **overrides) -> SMoRAConfig:
    return SMoRAConfig(**{"r": 8, "active_r": 2, "lora_alpha": 8, "bias_update_rate": RATE, "compute": compute,
                          **overrides})


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return model, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss, \
        lambda m: m.gradient_checkpointing_enable()


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = torch.tensor([0, 1, 2])
    return model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss, \
        lambda m: m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _swin():
    torch.manual_seed(0)
    model = create_model("swin_nano_patch2_window4_32", num_classes=5, drop_path_rate=0.0)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    return model, lambda m: F.cross_entropy(m(images), labels), lambda m: m.set_grad_checkpointing(True)


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4,
                              depth=2)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    return model, lambda m: F.cross_entropy(m(images), labels), lambda m: m.set_grad_checkpointing(True)


class Stack(nn.Module):
    """Two blocks, each optionally run through `torch.utils.checkpoint` (reentrant or not)."""

    def __init__(self, reentrant: bool | None = None):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.block2 = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
        self.classifier = nn.Linear(12, 3)
        self.reentrant = reentrant

    def forward(self, x):
        for block in (self.block1, self.block2):
            x = x + (block(x) if self.reentrant is None else
                     checkpoint.checkpoint(block, x, use_reentrant=self.reentrant))
        return self.classifier(x)


def _stack(reentrant: bool):
    torch.manual_seed(0)
    x, labels = torch.randn(16, 12, requires_grad=True), torch.randint(0, 3, (16,))
    return Stack(), lambda m: F.cross_entropy(m(x), labels), lambda m: setattr(m, "reentrant", reentrant)


FAMILIES = {"hf_llama": _tiny_llama, "hf_bert": _tiny_bert, "swin": _swin, "timm_vit": _timm_vit,
            "checkpoint_reentrant": lambda: _stack(True), "checkpoint_nonreentrant": lambda: _stack(False)}


def _one_step(model: nn.Module, loss_fn) -> dict:
    """Gradients of every trainable tensor, tokens routed per layer, and the state after an optimizer step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_fn(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    tokens = {n: r["tokens"] for n, r in routing_report(model).items()}
    optimizer.step()
    biases = {n: layer.lora_biases.clone() for n, layer in smora_layers(model).items()}
    loss_fn(model)  # a second step's forward routes with the moved bias and the new weights
    tokens_after = {n: r["tokens"] for n, r in routing_report(model).items()}
    return {"grads": grads, "tokens": tokens, "biases": biases, "tokens_after": tokens_after,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("compute", ["gather", "dense"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointing_changes_nothing(family, compute):
    model, loss_fn, enable_checkpointing = FAMILIES[family]()
    add_smora(model, _config(compute))
    model.train()
    for layer in smora_layers(model).values():  # a router that prefers some ranks, so balancing has work to do
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.2)
            layer.lora_router.weight.normal_(0, 1.0)
    twin = copy.deepcopy(model)
    enable_checkpointing(twin)
    plain, checkpointed = _one_step(model, loss_fn), _one_step(twin, loss_fn)

    assert plain["tokens"] == checkpointed["tokens"] and plain["tokens_after"] == checkpointed["tokens_after"]
    assert any(not torch.equal(b, torch.zeros_like(b)) for b in plain["biases"].values())  # balancing did move
    for kind in ("grads", "biases", "weights"):
        assert plain[kind].keys() == checkpointed[kind].keys()
        for name, value in plain[kind].items():
            assert _relative_error(checkpointed[kind][name], value) <= 1e-6, (kind, name)


def test_padding_is_not_counted_under_checkpointing():
    model, loss_fn, enable_checkpointing = _tiny_llama()
    add_smora(model, _config("gather", target_modules=("q_proj",)))
    model.train()
    enable_checkpointing(model)
    loss_fn(model).backward()
    assert {r["tokens"] for r in routing_report(model).values()} == {16}  # 10 + 6 real tokens, once each


# ---- copies: a deep copy or a pickled model is a working, independent SMoRA model ------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_route_on_their_own(how):
    model, _, _ = _tiny_bert()
    add_smora(model, _config("gather", target_modules=("query", "value")))
    model.eval()
    ids = torch.randint(0, 60, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)  # the user's own file
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    assert {r["tokens"] for r in routing_report(twin).values()} == {11}  # the copy's mask hook knows its layers
    assert {r["tokens"] for r in routing_report(model).values()} == {11}
    with disable_adapters(twin):
        assert all(layer.context.disabled for layer in smora_layers(twin).values())
        assert not any(layer.context.disabled for layer in smora_layers(model).values())

"""compress_activations: exact forward, close gradients, accounting, exclusion, any model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from tests.conftest import COPY_KINDS, round_trip

from leanformer import create_model
from leanformer.memory import (
    CompressionConfig,
    compress_activations,
    compression_of,
    compression_stats,
    decompress_activations,
    saved_activation_bytes,
)
from leanformer.memory.compress import _memory_order


def tiny_swin() -> nn.Module:
    return create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                        window_size=4, drop_path_rate=0.0, num_classes=10)


def tiny_msmlp() -> nn.Module:
    return create_model("msmlp_tiny", img_size=32, embed_dim=20, depths=(1, 1), drop_path_rate=0.0, num_classes=10,
                        mix_size=[[1, 1, 3, 5, 7], [1, 3, 3, 5, 7]])


def grads_of(model: nn.Module, inputs, loss_fn=lambda out: out.float().pow(2).mean()) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    loss_fn(out).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    den = sum(float(b[k].float().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


def compare(model: nn.Module, inputs, config: CompressionConfig, loss_fn=None) -> float:
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    exact = grads_of(model, inputs, **kwargs)
    compressed = compress_activations(copy.deepcopy(model), config)
    got = grads_of(compressed, inputs, **kwargs)
    assert exact.keys() == got.keys()
    return relative_error(got, exact)


@pytest.mark.parametrize("build", [tiny_swin, tiny_msmlp])
def test_forward_is_exact_and_gradients_are_close(build):
    model = build().train()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)  # with grad: the same kernels as the compressed training forward
    compressed = compress_activations(copy.deepcopy(model), CompressionConfig(bits=8))
    assert torch.equal(compressed(x), expected)
    assert compare(model, x, CompressionConfig(bits=8)) < 0.03
    assert compare(model, x, CompressionConfig(bits=4)) < 0.25


@pytest.mark.parametrize("compressed", [False, True])
def test_a_freed_saved_tensor_does_not_hide_a_later_one_at_its_address(compressed):
    """Graphs dropped during the block free their saved tensors; a later tensor (or compressed copy) may reuse the
    address (or id): it must be counted, not taken for the freed one."""

    class DropsGraphs(nn.Module):
        def forward(self, x):
            for scale in range(1, 6):
                kept = torch.sin(x * scale)  # sin saves x * scale; the graph (and what it saved) is freed at once
                del kept
            return x.sum()

    model = DropsGraphs()
    if compressed:
        model = compress_activations(model, CompressionConfig(bits=8, ops=("other",), range="batch"))
    x = torch.randn(64, 256, requires_grad=True)
    with saved_activation_bytes(model) as report:
        model(x)
    assert report.tensors == 5
    assert report.original_bytes == 5 * x.numel() * 4


def test_saved_bytes_shrink_with_bits():
    model = tiny_swin().train()
    x = torch.randn(4, 3, 32, 32)
    ratios = {}
    for bits in (8, 4, 2):
        compressed = compress_activations(copy.deepcopy(model), CompressionConfig(bits=bits))
        with saved_activation_bytes(compressed) as report:
            compressed(x).sum()
        ratios[bits] = report.ratio
    with saved_activation_bytes(model) as exact:
        model(x).sum()
    assert exact.ratio == 1.0 and exact.stored_bytes > 0
    assert ratios[8] < 0.3 and ratios[4] < 0.18 and ratios[2] < ratios[4]
    assert "layers.0.blocks.0.mlp.fc1" in report.per_module


def test_compressing_twice_is_an_error_and_undo_restores_exact_gradients():
    model = tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    exact = grads_of(model, x)
    compress_activations(model, CompressionConfig())
    with pytest.raises(ValueError, match="already compressed"):
        compress_activations(model, CompressionConfig())
    decompress_activations(model)
    again = grads_of(model, x)
    assert all(torch.equal(exact[k], again[k]) for k in exact)
    with pytest.raises(ValueError, match="not compressed"):
        decompress_activations(model)


def test_excluded_modules_and_ops_stay_exact():
    model = tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    assert compare(model, x, CompressionConfig(exclude_modules=".*")) == 0.0  # a regex: every module
    with pytest.raises(ValueError, match=r"exclude_modules=\('\*',\): '\*' is a shell pattern"):
        CompressionConfig(exclude_modules=("*",))
    compressed = compress_activations(copy.deepcopy(model), CompressionConfig(ops=("linear",)))
    with saved_activation_bytes(compressed) as report:
        compressed(x).sum()
    shrunk = {name for name, e in report.per_module.items() if e["stored"] < e["original"]}
    assert shrunk and all(name.endswith(("qkv", "proj", "fc1", "fc2", "reduction", "head.fc")) for name in shrunk)


def test_relu_output_is_kept_as_a_one_bit_mask():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    x = torch.randn(32, 64)
    compressed = compress_activations(copy.deepcopy(model), CompressionConfig(bits=8))
    with saved_activation_bytes(compressed) as report:
        compressed(x).sum()
    relu = report.per_module["1"]
    assert relu["stored"] * 32 == relu["original"]
    # the second Linear saves the ReLU output too: the mask is shared, stored once
    assert compare(model, x, CompressionConfig(bits=8)) < 0.02


def test_a_tensor_saved_by_two_ops_is_stored_once():
    class TwoUses(nn.Module):
        def forward(self, x):
            return torch.sin(x) * torch.cos(x)

    x = torch.randn(64, 256, requires_grad=True)
    model = compress_activations(TwoUses(), CompressionConfig(bits=8, ops=("other",), range="batch"))
    with saved_activation_bytes(model) as report:
        y = model(x)
    y.sum().backward()
    x_bytes = x.numel() * 4
    assert report.original_bytes <= 3 * x_bytes  # x once, sin(x) and cos(x)
    expected = torch.cos(x) * torch.cos(x) - torch.sin(x) * torch.sin(x)
    assert torch.allclose(x.grad, expected, atol=0.05)


def test_nan_propagates_like_the_exact_path():
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    x = torch.randn(32, 16)
    x[3, 2] = float("nan")
    exact = grads_of(model, x, loss_fn=lambda o: o.sum())
    got = grads_of(compress_activations(copy.deepcopy(model), CompressionConfig(min_numel=0)), x,
                   loss_fn=lambda o: o.sum())
    for key in exact:
        assert torch.equal(exact[key].isnan(), got[key].isnan()), key


def test_running_ranges_clamp_and_count():
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).train()
    compress_activations(model, CompressionConfig(min_numel=0, range="running", ema_decay=0.9, clip_stats_every=1))
    grads_of(model, torch.randn(32, 16))
    grads_of(model, 10 * torch.randn(32, 16))  # far outside the first batch's range: clamped, not wrapped
    stats = compression_stats(model)
    assert stats["running_sites"] > 0 and 0 < stats["clipped_fraction"] < 1


def test_works_with_gradient_checkpointing():
    model = tiny_swin()
    model.set_grad_checkpointing(True)
    assert compare(model, torch.randn(2, 3, 32, 32), CompressionConfig(bits=8)) < 0.03


def test_works_under_bf16_autocast():
    model = tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        error = compare(model, x, CompressionConfig(bits=8))
    assert error < 0.05


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=32, num_classes=10, drop_path_rate=0.0)
    kwargs |= dict(patch_size=4, depth=2) if name.startswith("vit") else dict(window_size=4, depths=(2, 2),
                                                                                 num_heads=(2, 4), embed_dim=32)
    model = timm.create_model(name, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert torch.equal(compress_activations(copy.deepcopy(model), CompressionConfig())(x), expected)
    assert compare(model, x, CompressionConfig(bits=8)) < 0.03


def test_huggingface_bert_and_llama():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128,
                                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                                   num_attention_heads=4, num_key_value_heads=2,
                                                                   intermediate_size=128))
    ids = torch.randint(0, 100, (2, 32))
    for model, pick in ((bert, lambda o: o.last_hidden_state), (llama, lambda o: o.logits)):
        model.train()
        expected = pick(model(ids))
        compressed = compress_activations(copy.deepcopy(model), CompressionConfig(bits=8, min_numel=256))
        assert torch.equal(pick(compressed(ids)), expected)
        with saved_activation_bytes(compressed) as report:
            pick(compressed(ids)).sum()
        assert report.ratio < 0.5
        error = compare(model, ids, CompressionConfig(bits=8, min_numel=256),
                        loss_fn=lambda o, pick=pick: pick(o).float().pow(2).mean())
        assert error < 0.05


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [(dict(bits=3), "bits"), (dict(group="row"), "group"), (dict(group=0), "group"), (dict(range="ema"), "range"),
     (dict(ema_decay=1.0), "ema_decay"), (dict(rounding="up"), "rounding"), (dict(ops=("mlp",)), "ops"),
     (dict(min_numel=-1), "min_numel"), (dict(clip_stats_every=0), "clip_stats_every")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressionConfig(**kwargs)


def test_running_ranges_follow_each_site_of_a_frozen_model():
    """Every save keeps its own running range across forwards: a frozen model on fresh inputs clips almost
    nothing (a mixed-up site, e.g. an attention map's range used for an MLP input, clips a lot)."""
    model = tiny_swin()
    compress_activations(model, CompressionConfig(range="running", clip_stats_every=1))
    for _ in range(5):
        model(torch.randn(4, 3, 32, 32)).sum()
    stats = compression_stats(model)
    assert stats["running_sites"] > 20 and stats["clipped_fraction"] < 0.05


def test_permuted_saved_tensors_are_quantised_in_memory_order():
    """Channels-last maps and transposed operands are quantised without a copy and come back with their strides."""
    x = torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last)
    assert _memory_order(x) == (0, 2, 3, 1)
    assert _memory_order(torch.randn(3, 20, 12).transpose(1, 2)) == (0, 2, 1)
    assert _memory_order(torch.randn(6, 6)[:, :3]) is None  # not a dense block: quantising copies it
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 3, padding=1))
    net = net.to(memory_format=torch.channels_last)
    exact = grads_of(net, x)
    compressed = compress_activations(copy.deepcopy(net), CompressionConfig(bits=8, min_numel=16))
    assert relative_error(grads_of(compressed, x), exact) < 0.03
    stored = compression_of(compressed)._quantize(x, ("0", "conv", 0))
    out = stored.unpack()
    assert out.shape == x.shape and out.stride() == x.stride()
    assert float((out - x).abs().max()) <= float(stored.payload.step.max()) * 1.01


# -- copies: deepcopy and pickle (torch.save of the whole module) --------------------------------------------------


def _swin_nano():
    return create_model("swin_nano_patch2_window4_32", drop_path_rate=0.0), torch.randn(2, 3, 32, 32), \
        lambda out: out, CompressionConfig(bits=8)


def _timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    return model, torch.randn(2, 3, 32, 32), lambda out: out, CompressionConfig(bits=8)


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)
    return transformers.BertModel(config), torch.randint(0, 100, (2, 32)), lambda out: out.last_hidden_state, \
        CompressionConfig(bits=8, min_numel=256)


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaForCausalLM(config), torch.randint(0, 100, (2, 32)), lambda out: out.logits, \
        CompressionConfig(bits=8, min_numel=256)


COPY_FAMILIES = {"our_swin": _swin_nano, "timm_vit": _timm_vit, "hf_bert": _hf_bert, "hf_llama": _hf_llama}


def _saved_ratio(model: nn.Module, inputs, pick) -> float:
    with saved_activation_bytes(model) as report:
        pick(model(inputs)).sum()
    return report.ratio


@pytest.mark.parametrize("how", COPY_KINDS)
@pytest.mark.parametrize("family", sorted(COPY_FAMILIES))
def test_a_copy_of_a_compressed_model_is_a_compressed_model_of_its_own(family, how):
    """A deep copy or an unpickled copy stores compressed activations through its own hooks (a copy whose hooks
    still served the original stored exact activations while reporting itself compressed), computes what the
    original computes, and is decompressed and compressed again without touching the original."""
    model, inputs, pick, config = COPY_FAMILIES[family]()
    model.eval()  # no dropout: the original's and the copy's forwards are comparable
    loss = lambda out: pick(out).float().pow(2).mean()
    exact = grads_of(model, inputs, loss)
    ratio = _saved_ratio(compress_activations(model, config), inputs, pick)
    assert ratio < 0.5

    twin = round_trip(model, how)
    assert compression_of(twin) is not None and compression_of(twin) is not compression_of(model)
    with pytest.raises(ValueError, match="already compressed"):
        compress_activations(twin, config)
    assert _saved_ratio(twin, inputs, pick) == pytest.approx(ratio, abs=0.01)
    assert torch.equal(pick(twin(inputs)), pick(model(inputs)))
    assert relative_error(grads_of(twin, inputs, loss), exact) < 0.05

    decompress_activations(twin)
    assert _saved_ratio(twin, inputs, pick) == 1.0
    again = grads_of(twin, inputs, loss)
    assert all(torch.equal(exact[k], again[k]) for k in exact)
    assert _saved_ratio(model, inputs, pick) == pytest.approx(ratio, abs=0.01)  # the original is still compressed
    assert relative_error(grads_of(model, inputs, loss), exact) < 0.05
    compress_activations(twin, config)
    assert _saved_ratio(twin, inputs, pick) == pytest.approx(ratio, abs=0.01)


def test_copying_one_block_of_a_compressed_model_copies_that_block_only():
    """The hooks of a block reach the compressor, which must not reach the model: copying one block (as EMA,
    layer cloning or pruning code does) would otherwise copy the whole model with it."""
    model = compress_activations(tiny_swin(), CompressionConfig())
    memo: dict = {}
    block = copy.deepcopy(model.layers[0].blocks[0], memo)
    assert id(model) not in memo and id(model.head) not in memo
    x = torch.randn(2, 8, 8, 32)
    torch.testing.assert_close(block(x), model.layers[0].blocks[0](x), atol=0, rtol=0)


# -- the Triton kernels (the GPU path), run on CPU tensors by Triton's interpreter ----------------------------------


def _channels_last_net() -> tuple[nn.Module, torch.Tensor]:
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    return net, torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("family", ["swin", "channels_last", "hf_llama"])
def test_triton_kernels_train_like_the_reference(family, triton_on_cpu, monkeypatch):
    """Nearest rounding: the Triton path stores the same codes as the PyTorch reference, so gradients and the saved
    bytes report agree; stochastic rounding keeps gradients as close to exact as on the CPU."""
    torch.manual_seed(0)
    if family == "swin":
        model, inputs, pick = tiny_swin().train(), torch.randn(2, 3, 32, 32), lambda out: out
    elif family == "channels_last":
        (model, inputs), pick = _channels_last_net(), lambda out: out
    else:
        model, inputs, pick, _ = _hf_llama()
    loss_fn = lambda out: pick(out).float().pow(2).mean()
    nearest = CompressionConfig(bits=4, rounding="nearest", min_numel=16)

    def run(config: CompressionConfig) -> tuple[dict, float]:
        compressed = compress_activations(copy.deepcopy(model), config)
        with saved_activation_bytes(compressed) as report:
            grads = grads_of(compressed, inputs, loss_fn)
        return grads, report.ratio

    got, got_ratio = run(nearest)
    with monkeypatch.context() as reference:
        reference.setenv("LEANFORMER_TRITON", "0")
        reference.setenv("LEANFORMER_NATIVE", "0")
        want, want_ratio = run(nearest)
    assert got.keys() == want.keys()
    assert relative_error(got, want) < 1e-5
    assert got_ratio == want_ratio < 0.5
    assert compare(model, inputs, CompressionConfig(bits=8, min_numel=16), loss_fn) < 0.03

"""MS-MLP: reference parity, fused mixer vs plain reference, shapes, checkpoints, validation, flops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tests.conftest import assert_rejects_bad_images, load_reference_fixture

from leanformer.models._registry import create_model
from leanformer.models.msmlp import MSMLP, MixShiftBlock, chunk_sizes, msmlp_base, msmlp_small, msmlp_tiny

SMALL = dict(img_size=64, embed_dim=10, depths=(1, 1, 2, 1), num_classes=7, drop_path_rate=0.0)


def small_model(**kwargs) -> MSMLP:
    torch.manual_seed(0)
    return MSMLP(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "fn, expected", [(msmlp_tiny, 28_656_232), (msmlp_small, 50_303_752), (msmlp_base, 88_696_792)]
)
def test_parameter_counts(fn, expected):
    with torch.device("meta"):
        model = fn()
    assert sum(p.numel() for p in model.parameters()) == expected


def test_chunk_sizes_match_torch_chunk():
    for dim in (10, 24, 96, 192, 768):
        assert chunk_sizes(dim, 5) == [t.shape[0] for t in torch.chunk(torch.zeros(dim), 5)]


def test_reference_fixture_parity(tmp_path):
    ref = load_reference_fixture("msmlp_reference_small.safetensors")
    config, state = ref["config"], ref["state"]
    x, features, logits = ref["input"], ref["features"], ref["logits"]
    path = tmp_path / "reference.safetensors"
    save_file(state, str(path))
    model = create_model("msmlp_tiny", checkpoint_path=path, **config).eval()
    assert set(model.state_dict()) == set(state)  # our layout is the reference's
    for fused in (True, False):
        model.set_fused(fused)
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
            out = model(x)
        assert (feats - features).abs().max().item() < 1e-4
        assert (out - logits).abs().max().item() < 1e-4


def plain_mix(block: MixShiftBlock, x_nchw: torch.Tensor) -> torch.Tensor:
    """The reference token mixer written out: roll each group, conv each group, both branches."""
    groups = torch.chunk(x_nchw, len(block.chunks), dim=1)
    out_lr, out_td = [], []
    for g, shift, lr, td in zip(groups, block.shift_dist, block.dwconv_lr, block.dwconv_td, strict=True):
        k = lr.kernel_size[0]
        out_lr.append(F.conv2d(torch.roll(g, shift, 3), lr.weight, lr.bias, padding=k // 2, groups=g.shape[1]))
        out_td.append(F.conv2d(torch.roll(g, shift, 2), td.weight, td.bias, padding=k // 2, groups=g.shape[1]))
    return torch.cat(out_lr, 1) + torch.cat(out_td, 1)


@pytest.mark.parametrize(
    "dim, mix, shift, hw",
    [(24, (1, 1, 3, 5, 7), (-2, -1, 0, 1, 2), (9, 7)), (13, (3, 1, 3, 7, 5), (3, -4, 0, 1, 2), (5, 6)),
     (48, (1, 7, 7, 7, 7), (-2, -1, 0, 1, 2), (2, 3))],
)
def test_fused_mixer_matches_plain_reference(dim, mix, shift, hw):
    torch.manual_seed(0)
    block = MixShiftBlock(dim, 5, shift, mix)
    for p in block.parameters():
        p.data.normal_()
    x = torch.randn(2, *hw, dim, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours = block.mix_fused(x)
    ref = plain_mix(block, x_ref.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    grads_ours = torch.autograd.grad(ours, [x, *block.parameters()], g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, [x_ref, *block.parameters()], g, allow_unused=True)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fused_model_matches_reference_path_with_grads():
    model = small_model()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 37, 45)
    grads = []
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_state_dict_round_trip(tmp_path):
    model = small_model().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    path = tmp_path / "ours.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = create_model("msmlp_tiny", checkpoint_path=path, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("hw", [(64, 64), (37, 45), (4, 4), (70, 33)])
def test_any_input_size(hw):
    model = small_model().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *hw)).shape == (2, 7)
        feats = model.forward_features(torch.randn(1, 3, *hw))
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
    assert feats.shape == (1, 80, h, w)


def test_forward_intermediates_and_feature_info():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [m.shape for m in maps] == [(2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
                                       for info in model.feature_info]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    assert len(only) == 2 and only[0].shape == maps[2].shape
    assert nhwc[0].shape == (2, 16, 16, 10)
    for info in model.feature_info:
        model.get_submodule(info["module"])


def test_head_api_and_grad_checkpointing():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3)
    model.eval()  # no dropout/drop-path so both runs are identical
    model.zero_grad()
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.set_grad_checkpointing(True)
    model.zero_grad()
    model(x).sum().backward()
    for a, b in zip(plain, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mix_size=[[1, 1, 3, 5, 7]] * 3), "mix_size"),
        (dict(mix_size=[[1, 1, 3, 5, 6]] * 4), "mix_size"),
        (dict(mix_size=[[1, 1, 3, 5]] * 4), "mix_size"),
        (dict(shift_dist=[-1, 0, 1]), "shift_dist"),
        (dict(shift_size=4), "shift_dist"),
        (dict(embed_dim=6), "embed_dim"),
        (dict(patch_size=0), "patch_size"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(global_pool="max"), "global_pool"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MSMLP(**{**SMALL, **kwargs})


def test_bad_inputs():
    assert_rejects_bad_images(small_model(), 32)


def test_timm_create_model():
    timm = pytest.importorskip("timm")
    import leanformer.models.msmlp  # noqa: F401  (registers with timm)

    model = timm.create_model("msmlp_tiny", num_classes=3, img_size=32)
    assert isinstance(model, MSMLP) and model.num_classes == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_flops():
    with torch.device("meta"):
        model = msmlp_tiny()
    total = model.flops()
    assert 4.3e9 < total < 4.6e9
    # a 7x7 depthwise conv counts 49 MACs per output element, and everything scales with the map area
    block = model.layers[0].blocks[0]
    dw = 2 * sum(n * k * k for n, k in zip(block.chunks, block.mix_size, strict=True))
    assert dw == 2 * (20 * (1 + 1 + 9 + 25) + 16 * 49)
    hidden = block.pwconv1.out_features
    assert block.flops(56, 56) == 56 * 56 * (dw + 96 + 2 * 96 * hidden)
    assert model.flops(448) - 4 * model.flops(224) == -3 * (model.num_features * (1 + model.num_classes))

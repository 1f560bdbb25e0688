import math

import pytest
import torch
from safetensors.torch import save_file
from tests.conftest import assert_rejects_bad_images, load_reference_fixture

from leanformer import create_model
from leanformer.models.swin import SwinTransformer, window_attention_mask, window_token_order

PARAMS = {
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window7_224": 196_532_476,
    "swin_large_patch4_window12_384": 196_735_516,
}


def tiny(**kwargs) -> SwinTransformer:
    cfg = dict(img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=4,
               num_classes=10, drop_path_rate=0.0)
    return create_model("swin_tiny_patch4_window7_224", **{**cfg, **kwargs})


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_flops_match_official_counter():
    with torch.device("meta"):
        assert create_model("swin_tiny_patch4_window7_224").flops() == pytest.approx(4.494e9, rel=0.01)
        assert create_model("swin_base_patch4_window12_384").flops() == pytest.approx(47.105e9, rel=0.01)


def test_official_fixture_parity(tmp_path):
    ref = load_reference_fixture("swin_official_small.safetensors")
    path = tmp_path / "official.pth"
    torch.save({"model": ref["state"]}, path)  # as the official repository ships checkpoints
    model = create_model("swin_tiny_patch4_window7_224", checkpoint_path=path, **ref["config"]).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(ref["input"]), pre_logits=True)
        logits = model(ref["input"])
    assert (features - ref["features"]).abs().max() < 1e-4
    assert (logits - ref["logits"]).abs().max() < 1e-4


def test_timm_parity_with_same_weights():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("swin_tiny_patch4_window7_224").eval()
    ours = create_model("swin_tiny_patch4_window7_224").eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() < 1e-4


def test_timm_checkpoint_file_loads(tmp_path):
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                               depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), num_classes=10).eval()
    save_file(theirs.state_dict(), tmp_path / "timm.safetensors")
    ours = tiny(checkpoint_path=tmp_path / "timm.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def test_own_checkpoint_round_trip(tmp_path):
    model = tiny().eval()
    save_file(model.state_dict(), tmp_path / "ours.safetensors")
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    x = torch.randn(1, 3, 64, 64)
    for name in ("ours.safetensors", "ours.pth"):
        loaded = tiny(checkpoint_path=tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_bias_table_is_resized_for_another_window(tmp_path):
    save_file(tiny(window_size=4).state_dict(), tmp_path / "w4.safetensors")
    model = tiny(window_size=8, img_size=128, checkpoint_path=tmp_path / "w4.safetensors")
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 1)


def test_checkpoint_errors_name_the_keys(tmp_path):
    state = tiny().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.weight"]
    state["head.fc.weight"] = torch.zeros(3, 192)
    save_file(state, tmp_path / "bad.safetensors")
    expected = r"missing keys: norm\.weight.*unexpected keys: extra\.weight.*head\.fc\.weight"
    with pytest.raises(ValueError, match=expected):
        tiny(checkpoint_path=tmp_path / "bad.safetensors")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        tiny(checkpoint_path=tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match="does not exist"):
        tiny(checkpoint_path=tmp_path / "missing.safetensors")


def test_untrusted_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not be read"):
        tiny(checkpoint_path=tmp_path / "evil.pth")


def naive_shifted_windows(x, window, shift):
    """Official order of operations: roll, then partition into windows (reference for the gather)."""
    B, H, W, C = x.shape
    x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift else x
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, -1, C)


@pytest.mark.parametrize("shift", [0, 2])
def test_token_order_equals_roll_and_partition(shift):
    x = torch.randn(2, 8, 12, 5)
    order = window_token_order(8, 12, 4, shift)
    assert torch.equal(x.reshape(2, -1, 5)[:, order], naive_shifted_windows(x, 4, shift))


def official_mask(H, W, window, shift):
    """The official construction of the shifted-window mask, written out plainly."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = naive_shifted_windows(img, window, 0).view(-1, window * window)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


def test_shift_mask_equals_official():
    assert torch.equal(window_attention_mask(8, 12, (8, 12), 4, 2), official_mask(8, 12, 4, 2))
    assert window_attention_mask(8, 12, (8, 12), 4, 0) is None


def test_padded_tokens_are_masked_out():
    """A 3x3 map in a 4x4 window: real tokens attend only to each other (reference written out)."""
    block = tiny().eval().layers[1].blocks[0]  # unshifted, window 4, 48 channels, 2 heads
    x = torch.randn(1, 3, 3, 48)
    attn = block.attn
    sel = torch.tensor([r * 4 + c for r in range(3) for c in range(3)])  # positions inside the window
    with torch.no_grad():
        h = block.norm1(x).view(9, 48)
        q, k, v = attn.qkv(h).view(9, 3, 2, 24).permute(1, 2, 0, 3)
        bias = attn.relative_position_bias()[:, sel][:, :, sel]
        weights = torch.softmax(q @ k.transpose(-1, -2) / 24**0.5 + bias, dim=-1)
        y = x + attn.proj((weights @ v).transpose(0, 1).reshape(9, 48)).view(1, 3, 3, 48)
        expected = y + block.mlp(block.norm2(y))
        assert torch.allclose(block(x), expected, atol=1e-5)
    mask = window_attention_mask(8, 8, (6, 7), 4, 2)
    assert (mask == 0).any(-1).all()  # every query, padded or not, can attend to something


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (33, 47), (16, 16)])
def test_any_input_size(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_odd_size_equals_explicit_zero_padding_of_image_when_aligned():
    model = tiny().eval()
    x = torch.randn(1, 3, 62, 61)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 3, 0, 2))
        assert torch.allclose(model.patch_embed(x), model.patch_embed(padded), atol=1e-6)


def test_forward_intermediates_and_features_only():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2)]
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    feats = tiny(features_only=True, out_indices=(1, 3)).eval()
    feats.model.load_state_dict(model.state_dict())
    out = feats(x)
    assert [m.shape[1] for m in out] == [48, 192] and [f["reduction"] for f in feats.feature_info] == [8, 32]
    assert torch.allclose(out[1], maps[3], atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(ref, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_gradients_flow_to_every_parameter():
    model = tiny()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_reset_classifier_and_pre_logits():
    model = tiny()
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 192)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_heads=(5, 2, 3, 4)), "num_heads"),
        (dict(depths=(2, 2)), "depths"),
        (dict(window_size=0), "window_size"),
        (dict(num_classes=-1), "num_classes"),
        (dict(global_pool="max"), "global_pool"),
        (dict(no_such_arg=1), "no_such_arg"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kwargs)


def test_bad_inputs_are_explained():
    assert_rejects_bad_images(tiny(), 64)
    with pytest.raises(ValueError, match="in_chans=1"):
        tiny()(torch.randn(1, 1, 64, 64))


def test_flops_scale_with_area():
    model = tiny()
    small, big = model.flops(64), model.flops(128)
    assert 3.5 < big / small < 4.5
    assert model.flops((64, 64)) == small and math.isfinite(small)

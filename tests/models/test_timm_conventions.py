"""timm's conventions on our backbones: pretrained_cfg, FeatureInfo, and timm.create_model(features_only=True)."""

import pytest
import torch

import leanformer
from leanformer.data import load_digits_split

# small configs of a registered name timm lacks per family: (name, kwargs, out_indices, channels, reductions, modules)
SMALL = {
    "msmlp_tiny": (dict(img_size=32, embed_dim=20, depths=(1, 1, 1, 1)), (1, 3), [40, 160], [8, 32],
                   ["layers.1.blocks", "layers.3.blocks"]),
    "swin_nano_patch2_window4_32": (dict(embed_dim=12, depths=(1, 1, 1)), (0, 2), [12, 48], [2, 8],
                                    ["layers.0", "layers.2"]),
}


def build_on_meta(name: str, **kwargs):
    with torch.device("meta"):
        return leanformer.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(SMALL))
def test_timm_features_only_gives_our_maps_and_feature_info(name):
    timm = pytest.importorskip("timm")
    kwargs, out_indices, channels, reductions, modules = SMALL[name]
    theirs = timm.create_model(name, features_only=True, out_indices=out_indices, **kwargs).eval()
    ours = leanformer.create_model(name, features_only=True, out_indices=out_indices, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = theirs(x)
        for got, want in zip(maps, ours(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [m.shape[1] for m in maps] == channels
    assert [32 // m.shape[-1] for m in maps] == reductions
    for feats in (theirs, ours):
        info = feats.feature_info
        assert (info.channels(), info.reduction(), info.module_name()) == (channels, reductions, modules)
        assert "num_classes" not in feats.pretrained_cfg and feats.pretrained_cfg["input_size"][0] == 3


def test_timm_feature_wrappers_accept_our_backbones():
    timm = pytest.importorskip("timm")
    kwargs, out_indices, channels, _, _ = SMALL["msmlp_tiny"]
    getter = timm.create_model("msmlp_tiny", features_only=True, feature_cls="getter", out_indices=out_indices,
                               **kwargs).eval()
    ours = leanformer.create_model("msmlp_tiny", features_only=True, out_indices=out_indices, **kwargs).eval()
    ours.load_state_dict(getter.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(getter(x), ours(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert getter.feature_info.channels() == channels


def test_feature_info_answers_as_timms_does():
    timm = pytest.importorskip("timm")
    feats = build_on_meta("swin_tiny_patch4_window7_224", features_only=True, out_indices=(1, -1))
    ours, backbone = feats.feature_info, feats.model.feature_info
    reference = timm.models.FeatureInfo([dict(stage) for stage in backbone], (1, 3))
    assert ours.out_indices == feats.out_indices == (1, 3)
    for accessor in ("channels", "reduction", "module_name"):
        for idx in (None, 0, [0, 2]):
            assert getattr(ours, accessor)(idx) == getattr(reference, accessor)(idx), (accessor, idx)
    assert ours.get_dicts(["num_chs"]) == reference.get_dicts(["num_chs"]) == [{"num_chs": 192}, {"num_chs": 768}]
    assert ours.from_other((0,)).channels() == [96]
    assert [stage["reduction"] for stage in ours] == [8, 32] and len(ours) == 2  # still the selected stages' list
    assert backbone.channels() == [96, 192, 384, 768]
    assert build_on_meta("msmlp_tiny", features_only=True, out_indices=2).feature_info.reduction() == [16, 32]


@pytest.mark.parametrize("name", leanformer.list_models())
def test_every_model_carries_a_pretrained_cfg_for_itself(name):
    model = build_on_meta(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["architecture"] == name
    assert cfg["input_size"] == (model.in_chans, model.img_size, model.img_size)
    assert cfg["num_classes"] == model.num_classes and len(cfg["mean"]) == len(cfg["std"]) == model.in_chans
    assert cfg["fixed_input_size"] is False and 0 < cfg["crop_pct"] <= 1
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    timm = pytest.importorskip("timm")
    timm.models.PretrainedCfg(**cfg)  # every field is one timm knows
    if timm.models.model_entrypoint(name).__module__ == type(model).__module__:  # registered with timm by us
        assert timm.models.get_pretrained_cfg(name).to_dict().items() >= cfg.items()


def test_resolve_model_data_config_follows_the_model():
    timm = pytest.importorskip("timm")
    from timm.data import resolve_model_data_config

    nano = resolve_model_data_config(leanformer.create_model("swin_nano_patch2_window4_32"))
    assert nano["input_size"] == (3, 32, 32) and nano["crop_pct"] == 1.0 and nano["interpolation"] == "bilinear"
    grey = timm.create_model("swin_nano_patch2_window4_32", in_chans=1, img_size=48, num_classes=10)
    assert resolve_model_data_config(grey)["input_size"] == (1, 48, 48) and grey.pretrained_cfg["num_classes"] == 10
    assert len(resolve_model_data_config(grey)["mean"]) == 1
    tiny = resolve_model_data_config(build_on_meta("swin_tiny_patch4_window7_224", img_size=160))
    assert tiny["input_size"] == (3, 160, 160) and tiny["crop_pct"] == 0.9
    assert tiny["mean"] == (0.485, 0.456, 0.406) and tiny["std"] == (0.229, 0.224, 0.225)
    assert resolve_model_data_config(build_on_meta("swin_base_patch4_window12_384"))["input_size"] == (3, 384, 384)
    msmlp = resolve_model_data_config(timm.create_model("msmlp_tiny", **SMALL["msmlp_tiny"][0]))
    assert msmlp["input_size"] == (3, 32, 32) and msmlp["crop_pct"] == 0.875


def test_swin_nano_normalises_as_the_digits_pipeline():
    """The pipeline maps [0, 1] digits (all have 0 and 1 pixels) by (x - mean) / std; read them back."""
    train, _ = load_digits_split(8)  # 8 px: no resize, so the extremes are exactly those of 0 and 1
    images = train.tensors[0]
    std = 1 / (images.max() - images.min()).item()
    mean = -images.min().item() * std
    cfg = leanformer.create_model("swin_nano_patch2_window4_32", in_chans=1).pretrained_cfg
    assert cfg["mean"] == pytest.approx((mean,), abs=1e-4) and cfg["std"] == pytest.approx((std,), abs=1e-4)

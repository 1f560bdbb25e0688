import pytest
import torch

import leanformer
from leanformer.models import is_model


def test_list_models_has_both_families():
    names = leanformer.list_models()
    assert "swin_tiny_patch4_window7_224" in names and "msmlp_tiny" in names
    assert leanformer.list_models("msmlp_*") == ["msmlp_base", "msmlp_small", "msmlp_tiny"]
    assert is_model("msmlp_tiny") and not is_model("resnet50")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean swin_tiny_patch4_window7_224"):
        leanformer.create_model("swin_tiny_patch4_window7")


def test_pretrained_is_refused_with_a_way_out():
    with pytest.raises(ValueError, match="checkpoint_path"):
        leanformer.create_model("msmlp_tiny", pretrained=True)


def test_kwargs_override_defaults():
    with torch.device("meta"):
        model = leanformer.create_model("swin_tiny_patch4_window7_224", num_classes=7, in_chans=1, embed_dim=48,
                                        num_heads=(2, 4, 8, 16))
    assert model.head.fc.out_features == 7 and model.patch_embed.proj.in_channels == 1
    assert model.num_features == 384


def test_out_indices_needs_features_only():
    with pytest.raises(ValueError, match="features_only"):
        leanformer.create_model("msmlp_tiny", out_indices=(0,))


@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "msmlp_tiny"])
def test_an_argument_the_model_does_not_take_is_a_user_error(name):
    with pytest.raises(ValueError, match=r"takes no argument windw_size; it takes .*num_classes"):
        leanformer.create_model(name, windw_size=4)


def test_a_type_error_inside_the_constructor_is_not_turned_into_a_user_error(monkeypatch):
    from leanformer.models import swin

    def broken(self, *args, **kwargs):
        raise TypeError("a bug in the constructor")

    monkeypatch.setattr(swin.SwinTransformer, "__init__", broken)
    with pytest.raises(TypeError, match="a bug in the constructor"):
        leanformer.create_model("swin_nano_patch2_window4_32")

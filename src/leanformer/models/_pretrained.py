"""Pretrained configs (timm's `pretrained_cfg`): the input a model expects, attached to every model built.

timm's data API (`timm.data.resolve_model_data_config(model)`) reads `model.pretrained_cfg` to choose the
input size, normalisation, resize interpolation and crop; without one it assumes ImageNet at 224 px,
wrong for a 32 px model. Each family module holds `default_cfgs` (variant name -> cfg dict, the layout
timm's `register_model` reads), built with `make_cfg`.

leanformer hosts no weights, so a cfg describes the data a variant is meant for and, once built, the
model itself: an overridden `img_size`, `in_chans` or `num_classes` shows in it (timm 1.0.31 keeps a
source checkpoint's values there and records the built size in `model._traits`; here there is no
source checkpoint, so the model as built is what the cfg can truthfully describe).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch.nn as nn

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# fields that follow the model as built (the rest describe the data a variant is meant for)
AS_BUILT_FIELDS = ("architecture", "input_size", "mean", "std", "num_classes")
# classification-only fields a features_only model drops, as timm's `pretrained_cfg_for_features`
_CLASSIFIER_FIELDS = ("num_classes", "classifier", "global_pool")


def make_cfg(**fields) -> dict:
    """A variant's cfg: ImageNet-1k at 224 px, bicubic resize, 0.9 centre crop, unless `fields` say otherwise.

    `fixed_input_size` is False because our backbones pad any input size (timm's Swin fixes it).
    """
    return {
        "input_size": (3, 224, 224),
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        **fields,
    }


def per_channel(stats: Sequence[float], channels: int) -> tuple[float, ...]:
    """Normalisation stats for `channels` input channels.

    As given when they fit; otherwise their average on every channel, so a grey model gets the grey
    equivalent of RGB statistics and a 3-channel copy of a grey model gets its one value three times
    (a mismatched length would make torchvision's Normalize broadcast 1 channel to 3 silently).
    """
    if len(stats) == channels:
        return tuple(stats)
    return (sum(stats) / len(stats),) * channels


def cfg_as_built(cfg: dict, variant: str, in_chans: int | None = None, img_size: int | None = None,
                 num_classes: int | None = None) -> dict:
    """`cfg` for the model `variant` built with these values (None: the cfg's own)."""
    channels, height, width = cfg["input_size"]
    channels = channels if in_chans is None else in_chans
    height, width = (height, width) if img_size is None else (img_size, img_size)
    return {
        **cfg,
        "architecture": variant,
        "input_size": (channels, height, width),
        "mean": per_channel(cfg["mean"], channels),
        "std": per_channel(cfg["std"], channels),
        "num_classes": cfg["num_classes"] if num_classes is None else num_classes,
    }


def cfg_for_features(cfg: dict) -> dict:
    """The cfg of a features_only model: the backbone's without its classifier fields."""
    return {k: v for k, v in cfg.items() if k not in _CLASSIFIER_FIELDS}


def set_pretrained_cfg(module: nn.Module, cfg: dict) -> None:
    """Attach `cfg` as timm does: `pretrained_cfg`, and `default_cfg` as an alias of the same dict."""
    module.pretrained_cfg = cfg
    module.default_cfg = cfg


def build_variant(cls: Callable[..., nn.Module], variant: str, cfg: dict, args: dict) -> nn.Module:
    """`cls(**args)` carrying `cfg` as built (the class has `in_chans`, `img_size`, `num_classes`). An argument
    the constructor does not take is a ValueError naming it; a TypeError raised inside the constructor is a bug
    and is left alone."""
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(args) - set(parameters))
        if unknown:
            raise ValueError(f"{variant}: {cls.__name__} takes no argument {', '.join(unknown)}; it takes "
                             f"{', '.join(parameters)}")
    model = cls(**args)
    set_pretrained_cfg(model, cfg_as_built(cfg, variant, model.in_chans, model.img_size, model.num_classes))
    return model

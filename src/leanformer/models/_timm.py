"""Registration with timm, through its public API: `timm.create_model` builds our variants.

Only names timm does not know are registered (timm has its own `swin_tiny_patch4_window7_224` and so
on; those stay timm's), e.g. `msmlp_tiny` and `swin_nano_patch2_window4_32`. The entrypoint builds
through timm's `build_model_with_cfg`, so timm's handling applies unchanged: the family's
`default_cfgs` become timm's registered pretrained cfgs, the model gets timm's traits, and
`features_only=True` (with `out_indices`, or another timm `feature_cls`) wraps it, by default in our
`FeatureExtractor`, the same module `leanformer.create_model(..., features_only=True)` returns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch.nn as nn

from ._features import FeatureExtractor
from ._pretrained import AS_BUILT_FIELDS, cfg_as_built
from ._registry import list_models, model_entrypoint


def register_with_timm(module_name: str) -> None:
    """Register the variants defined in `module_name` with timm, if timm is installed."""
    try:
        import timm.models as timm_models
    except ImportError:
        return
    for name in list_models():
        fn = model_entrypoint(name)
        if fn.__module__ == module_name and not timm_models.is_model(name):
            timm_models.register_model(_timm_entrypoint(fn))


def _timm_entrypoint(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """timm's entrypoint signature around our entrypoint `fn`, built by `build_model_with_cfg`.

    The cfg overlay carries the model as built (input size, classes), so timm's resolved
    `pretrained_cfg` agrees with `leanformer.create_model`'s. timm registers the cfgs of
    `sys.modules[entrypoint.__module__].default_cfgs`, hence the family's module name here.
    """
    variant = fn.__name__
    cfg = sys.modules[fn.__module__].default_cfgs[variant]

    def entrypoint(pretrained: bool = False, pretrained_cfg_overlay: dict | None = None, **kwargs) -> nn.Module:
        from timm.models import build_model_with_cfg

        if pretrained:
            raise ValueError(f"{variant}: pretrained=True is not supported: leanformer never downloads weights; "
                             "load a local file with checkpoint_path=...")
        built = cfg_as_built(cfg, variant, kwargs.get("in_chans"), kwargs.get("img_size"), kwargs.get("num_classes"))
        overlay = {**{k: built[k] for k in AS_BUILT_FIELDS}, **(pretrained_cfg_overlay or {})}
        features = {"feature_cls": FeatureExtractor, "out_indices": None}  # None: all stages, however many
        return build_model_with_cfg(fn, variant, False, pretrained_cfg_overlay=overlay, feature_cfg=features, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = fn.__module__
    entrypoint.__doc__ = fn.__doc__
    return entrypoint

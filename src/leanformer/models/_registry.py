"""Model registry in timm's style: named variant entrypoints that hold default arguments.

`create_model(name, **kwargs)` looks the name up, lets any constructor argument be overridden
by keyword, and optionally loads a local checkpoint through the family's filter function.
Nothing is ever downloaded: weights come from `checkpoint_path`.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from collections.abc import Callable, Sequence
from os import PathLike

import torch
import torch.nn as nn

from .._machine import check_fits_in_memory
from ._checkpoint import load_checkpoint
from ._features import FeatureExtractor

_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant entrypoint under its function name (decorator)."""
    name = fn.__name__
    if name in _entrypoints and _entrypoints[name] is not fn:
        raise ValueError(f"model name {name!r} is registered twice")
    _entrypoints[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered variants matching a shell-style `pattern`."""
    return sorted(n for n in _entrypoints if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _entrypoints


def weight_bytes(build: Callable[[], nn.Module]) -> int:
    """Bytes of the parameters and buffers ``build()`` would allocate, found by building it on the meta device
    (no memory, no initialisation work)."""
    with torch.device("meta"):
        model = build()
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entrypoint registered as `name` (KeyError if none)."""
    return _entrypoints[name]


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | PathLike | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered variant; `kwargs` override any constructor argument.

    `checkpoint_path` may be a `.safetensors` or `.pth`/`.pt`/`.bin` file in any key layout the
    family's `checkpoint_filter_fn` understands (ours, timm's, the official code's); mismatches
    raise `ValueError` naming the keys. `pretrained=True` is refused: there is no download, pass
    `checkpoint_path`. `features_only=True` returns a module whose forward gives the NCHW maps of
    the stages in `out_indices` (default all; an int n: the last n), as timm's `features_only` does.
    Every model carries `pretrained_cfg` (timm's: input size, mean/std, crop, interpolation) for the
    model as built, so `timm.data.resolve_model_data_config(model)` gives the right preprocessing.
    """
    if name not in _entrypoints:
        close = [n for n in list_models() if n.startswith(name)][:3]
        close = close or difflib.get_close_matches(name, _entrypoints, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: leanformer never downloads weights; "
            "pass a local file with checkpoint_path=..."
        )
    check_fits_in_memory(weight_bytes(lambda: _entrypoints[name](**kwargs)), f"{name} with {kwargs or 'defaults'}")
    model = _entrypoints[name](**kwargs)
    if checkpoint_path is not None:
        family = sys.modules[_entrypoints[name].__module__]
        load_checkpoint(model, checkpoint_path, getattr(family, "checkpoint_filter_fn", None))
    if features_only:
        return FeatureExtractor(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices is only used with features_only=True")
    return model

"""The projection layers leanformer reads as a matrix: nn.Linear, transformers' Conv1D and 1x1 nn.Conv2d.

GPT-2 and its descendants compute their projections with transformers' ``Conv1D`` (y = x W + b, W stored
(in, out)); ConvNeXt-style FFNs with 1x1 convolutions over NCHW maps (features in dimension 1). The sparsity tools
and the SMoRA adapters both work on such layers through one `LayerKind` each, which reads any of them in
nn.Linear's (out, in) convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["SUPPORTED_LAYERS", "LayerKind", "layer_kind"]


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight


def _conv1d_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight.t()  # transformers' Conv1D stores (in, out)


def _conv2d_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight[:, :, 0, 0]  # a view, whatever the strides (flatten would copy a re-laid-out weight)


def _linear_param(matrix: torch.Tensor) -> torch.Tensor:
    return matrix


def _conv1d_param(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.t()


def _conv2d_param(matrix: torch.Tensor) -> torch.Tensor:
    return matrix[:, :, None, None]


def _always_fits(_layer: nn.Module) -> str | None:
    return None


def _conv2d_unfit(layer: nn.Module) -> str | None:
    pointwise = tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1) and layer.groups == 1 \
        and tuple(layer.dilation) == (1, 1) and layer.padding in ((0, 0), "valid", "same")
    if pointwise:
        return None
    kernel = "x".join(map(str, layer.kernel_size))
    return (f"a {kernel} Conv2d (stride {tuple(layer.stride)}, padding {layer.padding}, groups {layer.groups}), an "
            "unsupported layer type: only 1x1 Conv2d projections (stride 1, no padding, groups 1) are supported")


@dataclass(frozen=True)
class LayerKind:
    """How to read one kind of projection layer as an (out, in) matrix, nn.Linear's convention.

    ``feature_dim`` is where the layer's input and output hold their features (-1, or 1 for NCHW maps);
    ``weight(layer)`` is an (out, in) view of its weight; ``as_param(matrix)`` is an (out, in) matrix shaped as the
    layer stores its weight (views both ways, so a re-laid-out weight stays a view); ``unfit(layer)`` says why
    an instance cannot be read so (a 3x3 Conv2d), None when it can.
    """

    name: str
    feature_dim: int
    weight: Callable[[nn.Module], torch.Tensor]
    as_param: Callable[[torch.Tensor], torch.Tensor]
    unfit: Callable[[nn.Module], str | None] = _always_fits


_KINDS = (LayerKind("Linear", -1, _linear_weight, _linear_param),
          LayerKind("Conv1D", -1, _conv1d_weight, _conv1d_param),
          LayerKind("Conv2d", 1, _conv2d_weight, _conv2d_param, _conv2d_unfit))
_BY_NAME = {kind.name: kind for kind in _KINDS}
SUPPORTED_LAYERS = "nn.Linear, transformers' Conv1D (GPT-2) or a 1x1 nn.Conv2d"


def layer_kind(layer: nn.Module) -> LayerKind | None:
    """The `LayerKind` of ``layer``'s class or of its nearest listed base class (FalconLinear is a Linear); a
    module that stands in for such a layer says which with a ``projection_kind`` class attribute."""
    standing_in = getattr(type(layer), "projection_kind", None)
    if standing_in is not None:
        return _BY_NAME[standing_in]
    for cls in type(layer).__mro__:
        kind = _BY_NAME.get(cls.__name__)
        if kind is not None:
            return kind
    return None

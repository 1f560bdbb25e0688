"""Small building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._linear import Linear


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescaling the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Transformer FFN: fc1 (C -> hidden), GELU, fc2 (hidden -> C)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def init_linear_and_norm(module: nn.Module) -> None:
    """Official Swin/MS-MLP init: Linear weights trunc_normal(0.02), biases 0, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def linear_drop_path_rates(drop_path_rate: float, depths: list[int]) -> list[list[float]]:
    """Stochastic-depth rate per block, rising linearly from 0 to `drop_path_rate`, split per stage."""
    n = sum(depths)
    rates = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


def pad_to_multiple_nhwc(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad an NHWC map at the bottom/right so H and W are multiples of the given sizes."""
    _, H, W, _ = x.shape
    pad_h, pad_w = (-H) % multiple_h, (-W) % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def check_image_batch(x: torch.Tensor, in_chans: int, patch_size: int, model_name: str) -> None:
    """Clear errors for the input mistakes users make most: wrong rank, channels or size."""
    if x.ndim != 4:
        raise ValueError(f"{model_name} expects an NCHW image batch, got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} was built for {in_chans} input channels but got {x.shape[1]} "
            f"(create it with in_chans={x.shape[1]})"
        )
    if min(x.shape[-2:]) < patch_size:
        raise ValueError(
            f"{model_name}: image {tuple(x.shape[-2:])} is smaller than the patch size {patch_size}"
        )


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()

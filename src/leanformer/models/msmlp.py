"""MS-MLP: mixing and shifting in vision MLPs.

Zheng, Yang, Wang, Huang, Zhou, "Mixing and Shifting: Exploiting Global and Local Dependencies in
Vision MLPs", 2022 (https://arxiv.org/abs/2202.06510). Reference code: JegZheng/MS-MLP.

Each block splits the channels into groups (`torch.chunk`), shifts group i by `shift_dist[i]` along W
(the "lr" branch) and along H (the "td" branch), mixes each shifted group with a depthwise conv of the
stage's kernel size, sums the branches and applies a LayerNorm + MLP with layer scale as a residual.

The state-dict layout is the reference code's own (`layers.{i}.blocks.{j}.dwconv_lr.{g}`,
`layers.{i}.downsample` at the *end* of stages 0-2, `norm` applied after pooling, classifier `head`),
so reference checkpoints load as they are. What this file adds over the reference:

- a fused token mixer (the default): consecutive groups sharing a kernel size are rolled into one
  channels-last map for both branches and mixed by one depthwise conv, so a block runs 2-4 convs
  instead of 10 (no zero-padded kernels, so no wasted MACs). The kernels are
  concatenated from the reference-layout parameters in every forward, so gradients reach them. The
  plain reference computation stays available (`fused=False`) and tests check one against the other;
- activations stay NHWC between blocks (convs see a channels-last view), so no layout copies;
- any input size: the image is padded to the patch size and odd maps before each downsampling;
- timm's model API: `forward_features`/`forward_head`/`forward_intermediates`, `feature_info`,
  `pretrained_cfg`, gradient checkpointing, and registration with timm when it is installed
  (`timm.create_model("msmlp_tiny", features_only=True)` works);
- `flops()` counting a k x k depthwise conv as k*k MACs per output element (the reference counts k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._features import FeatureInfo, stage_indices
from ._layers import (
    DropPath,
    check_image_batch,
    init_linear_and_norm,
    linear_drop_path_rates,
    pad_to_multiple_nhwc,
)
from ._linear import Linear
from ._pretrained import build_variant, make_cfg
from ._registry import register_model
from ._timm import register_with_timm

__all__ = ["MSMLP", "MixShiftBlock", "checkpoint_filter_fn", "msmlp_base", "msmlp_small", "msmlp_tiny"]

_DEFAULT_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
_DEFAULT_SHIFT_DIST = (-2, -1, 0, 1, 2)
# every LayerNorm of the reference model uses eps 1e-6 (checked against the reference fixture)
_LN_EPS = 1e-6


def chunk_sizes(dim: int, groups: int) -> list[int]:
    """Channel counts `torch.chunk(x, groups, dim=1)` produces (96, 5 -> 20, 20, 20, 20, 16)."""
    size = math.ceil(dim / groups)
    return [min(size, dim - start) for start in range(0, dim, size)]


def _kernel_runs(kernel_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(kernel, first group, end group) for each run of consecutive groups sharing a kernel size."""
    runs: list[tuple[int, int, int]] = []
    for g, k in enumerate(kernel_sizes):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], g + 1)
        else:
            runs.append((k, g, g + 1))
    return runs


class MixShiftBlock(nn.Module):
    """Shift channel groups along W and H, mix each with a depthwise conv, sum; then LN -> MLP -> layer scale."""

    def __init__(self, dim: int, shift_size: int, shift_dist: Sequence[int], mix_size: Sequence[int],
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.chunks = chunk_sizes(dim, shift_size)
        self.shift_dist = list(shift_dist)
        self.mix_size = list(mix_size)
        self.dwconv_lr = nn.ModuleList(nn.Conv2d(n, n, k, padding=k // 2, groups=n)
                                       for n, k in zip(self.chunks, self.mix_size, strict=True))
        self.dwconv_td = nn.ModuleList(nn.Conv2d(n, n, k, padding=k // 2, groups=n)
                                       for n, k in zip(self.chunks, self.mix_size, strict=True))
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        hidden = int(mlp_ratio * dim)
        self.pwconv1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path)
        self.fused = True
        offsets = [0]
        for n in self.chunks:
            offsets.append(offsets[-1] + n)
        self._runs = [(k, g0, g1, offsets[g0], offsets[g1]) for k, g0, g1 in _kernel_runs(self.mix_size)]

    def mix_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation on an NCHW map: per group roll + depthwise conv, both branches."""
        groups = torch.chunk(x, len(self.chunks), dim=1)
        shifts = self.shift_dist
        lr = [conv(torch.roll(g, s, dims=3)) for g, s, conv in zip(groups, shifts, self.dwconv_lr, strict=True)]
        td = [conv(torch.roll(g, s, dims=2)) for g, s, conv in zip(groups, shifts, self.dwconv_td, strict=True)]
        return torch.cat(lr, dim=1) + torch.cat(td, dim=1)

    def mix_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as `mix_reference` on an NHWC map, with one conv per run of equal kernel sizes.

        The rolled groups of a run (both branches) are concatenated into one channels-last map, so a
        single depthwise conv mixes them; the kernels are concatenated from the reference-layout
        parameters here, so gradients reach them.
        """
        B, H, W, _ = x.shape
        outs = []
        for k, g0, g1, c0, c1 in self._runs:
            lr, td, start = [], [], c0
            for g in range(g0, g1):
                group = x[..., start : start + self.chunks[g]]
                start += self.chunks[g]
                lr.append(torch.roll(group, self.shift_dist[g], dims=2))
                td.append(torch.roll(group, self.shift_dist[g], dims=1))
            convs = [*self.dwconv_lr[g0:g1], *self.dwconv_td[g0:g1]]
            weight = torch.cat([conv.weight for conv in convs])
            bias = torch.cat([conv.bias for conv in convs])
            y = torch.cat(lr + td, dim=3).permute(0, 3, 1, 2)  # channels-last NCHW view
            y = F.conv2d(y, weight, bias, padding=k // 2, groups=2 * (c1 - c0)).permute(0, 2, 3, 1)
            outs.append(y.reshape(B, H, W, 2, c1 - c0).sum(3))
        return torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> same shape."""
        mixed = self.mix_fused(x) if self.fused else self.mix_reference(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.drop(self.pwconv2(self.drop(self.act(self.pwconv1(self.norm(mixed))))))
        return x + self.drop_path(y * self.gamma)

    def flops(self, height: int, width: int) -> int:
        """MACs for one image: depthwise convs k*k per output element, LN one per element, linears."""
        dw = sum(n * k * k for n, k in zip(self.chunks, self.mix_size, strict=True))
        hidden = self.pwconv1.out_features
        return height * width * (2 * dw + self.dim + 2 * self.dim * hidden)


class ConvEmbed(nn.Module):
    """Conv with stride = kernel (patch embed, or the 2x2 downsampling) + LayerNorm; NHWC in and out.

    The input is zero-padded at the bottom/right to a multiple of the stride, so any size works.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, eps: float = _LN_EPS):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple_nhwc(x, self.patch_size, self.patch_size)
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def flops(self, height: int, width: int) -> int:
        """MACs for an (height, width) input: conv weights (no bias) plus one per normalised element."""
        h, w = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        return h * w * self.proj.out_channels * (self.proj.in_channels * self.patch_size**2 + 1)


class MSMLPStage(nn.Module):
    """`depth` mix-shift blocks, then (stages 0..n-2) a 2x2 stride-2 conv downsampling, as the reference."""

    def __init__(self, dim: int, depth: int, shift_size: int, shift_dist: Sequence[int], mix_size: Sequence[int],
                 mlp_ratio: float, drop: float, drop_path: Sequence[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            MixShiftBlock(dim, shift_size, shift_dist, mix_size, mlp_ratio, drop, drop_path[i]) for i in range(depth)
        )
        self.downsample = ConvEmbed(2, dim, 2 * dim) if downsample else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class MSMLP(nn.Module):
    """MS-MLP backbone + classifier. Argument names are the reference constructor's.

    Between blocks activations are NHWC; `forward_features` returns the last stage's map as NCHW
    (not normalised: the reference normalises after pooling, which `forward_head` does).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (3, 3, 9, 3),
        shift_size: int = 5,
        shift_dist: Sequence[int] = _DEFAULT_SHIFT_DIST,
        mix_size: Sequence[Sequence[int]] = _DEFAULT_MIX_SIZE,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        global_pool: str = "avg",
        fused: bool = True,
    ):
        super().__init__()
        _validate_config(img_size, patch_size, in_chans, num_classes, embed_dim, depths, shift_size, shift_dist,
                         mix_size, mlp_ratio, drop_rate, drop_path_rate, patch_norm, global_pool)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes, self.global_pool = num_classes, global_pool
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = ConvEmbed(patch_size, in_chans, embed_dim)
        rates = linear_drop_path_rates(drop_path_rate, list(depths))
        self.layers = nn.ModuleList(
            MSMLPStage(dims[i], depth, shift_size, shift_dist, mix_size[i], mlp_ratio, drop_rate, rates[i],
                       downsample=i < len(depths) - 1)
            for i, depth in enumerate(depths)
        )
        self.feature_info = FeatureInfo([
            {"num_chs": dims[i], "reduction": patch_size * 2**i, "module": f"layers.{i}.blocks"}
            for i in range(len(depths))
        ])
        self.norm = nn.LayerNorm(self.num_features, eps=_LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)
        self.set_fused(fused)

    def set_fused(self, enable: bool = True) -> None:
        """Choose the fused token mixer (default) or the plain reference computation."""
        for module in self.modules():
            if isinstance(module, MixShiftBlock):
                module.fused = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (0 removes it: `forward` then returns pooled features)."""
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_linear_and_norm(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (NCHW) -> last stage's feature map, NCHW, before the final LayerNorm."""
        check_image_batch(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x.permute(0, 2, 3, 1))
        for stage in self.layers:
            x = stage(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW map -> pooled + LayerNorm features (`pre_logits`, the reference's features) or logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-stage feature maps (after each stage's blocks, before its downsampling), timm's API.

        `indices`: stage indices, or an int n for the last n stages (default all). `norm` applies the
        final LayerNorm channel-wise to the last stage's map. Returns the maps, or
        (`forward_features` output, maps).
        """
        take = stage_indices(indices, len(self.layers), output_fmt)
        check_image_batch(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x.permute(0, 2, 3, 1))
        maps = []
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage.forward_blocks(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if intermediates_only and i == max(take):
                return maps
            if stage.downsample is not None:
                x = stage.downsample(x)
        return maps if intermediates_only else (x.permute(0, 3, 1, 2), maps)

    def flops(self, img_size: int | tuple[int, int] | None = None) -> int:
        """Multiply-accumulates for one image at `img_size` (default the configured size).

        Counted: conv and linear weights (a k x k depthwise conv is k*k per output element) and one
        per normalised element for every LayerNorm (patch embed, blocks, downsampling, the pooled
        vector). Not counted: biases, GELU, layer scale, residual adds, pooling, padding.
        """
        h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or (self.img_size,) * 2)
        total = self.patch_embed.flops(h, w)
        h, w = math.ceil(h / self.patch_size), math.ceil(w / self.patch_size)
        for stage in self.layers:
            total += sum(block.flops(h, w) for block in stage.blocks)
            if stage.downsample is not None:
                total += stage.downsample.flops(h, w)
                h, w = math.ceil(h / 2), math.ceil(w / 2)
        total += self.num_features  # final LayerNorm on the pooled vector
        if isinstance(self.head, nn.Linear):
            total += self.num_features * self.num_classes
        return total


def _validate_config(img_size, patch_size, in_chans, num_classes, embed_dim, depths, shift_size, shift_dist,
                     mix_size, mlp_ratio, drop_rate, drop_path_rate, patch_norm, global_pool) -> None:
    """Raise ValueError naming the first bad field of an MS-MLP config."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                        ("embed_dim", embed_dim), ("shift_size", shift_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r}: expected an integer >= 0")
    if len(depths) == 0 or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
        raise ValueError(f"depths={list(depths)!r}: expected a non-empty list of integers >= 0")
    if len(shift_dist) != shift_size or any(not isinstance(s, int) for s in shift_dist):
        raise ValueError(
            f"shift_dist={list(shift_dist)!r}: expected {shift_size} integer shifts (one per channel group, "
            f"shift_size={shift_size})"
        )
    if len(mix_size) != len(depths):
        raise ValueError(
            f"mix_size has {len(mix_size)} stages but depths={list(depths)} has {len(depths)}: "
            f"expected one list of kernel sizes per stage"
        )
    for i, sizes in enumerate(mix_size):
        if len(sizes) != shift_size:
            raise ValueError(
                f"mix_size[{i}]={list(sizes)!r}: expected {shift_size} kernel sizes (shift_size={shift_size})"
            )
        for k in sizes:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"mix_size[{i}]={list(sizes)!r}: kernel size {k!r} must be an odd positive integer")
    for i in range(len(depths)):
        dim = embed_dim * 2**i
        if len(chunk_sizes(dim, shift_size)) != shift_size:
            raise ValueError(
                f"embed_dim={embed_dim}: stage {i} has {dim} channels, which torch.chunk splits into "
                f"{len(chunk_sizes(dim, shift_size))} groups, not shift_size={shift_size}; expected a stage width "
                f"that gives exactly shift_size groups"
            )
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio={mlp_ratio!r}: expected a positive number")
    for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r}: expected a probability in [0, 1)")
    if not patch_norm:
        raise ValueError("patch_norm=False is not supported: expected True (every released MS-MLP uses it)")
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: expected 'avg' or ''")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MSMLP) -> dict[str, torch.Tensor]:
    """Translate a checkpoint into this model's layout (the reference layout).

    Our layout is the reference code's, so this only strips `module.`/`state.` prefixes, moves a
    timm-style `head.fc.*` classifier to `head.*` and drops training-only keys.
    """
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "state."):
            key = key.removeprefix(prefix)
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        if key.endswith(("attn_mask", "num_batches_tracked")):
            continue
        out[key] = value
    return out


# The reference evaluates as the Swin code base it builds on: bicubic resize to 256, centre crop 224
# (crop_pct 0.875), ImageNet mean/std; the classifier is `head` (reference layout).
default_cfgs = {name: make_cfg(crop_pct=0.875, classifier="head")
                for name in ("msmlp_tiny", "msmlp_small", "msmlp_base")}


def _create_msmlp(variant: str, defaults: dict, kwargs: dict) -> MSMLP:
    return build_variant(MSMLP, variant, default_cfgs[variant], {**defaults, **kwargs})


@register_model
def msmlp_tiny(**kwargs) -> MSMLP:
    """MS-MLP-T: 28.7M params, ImageNet-1K top-1 82.1 (reference)."""
    return _create_msmlp("msmlp_tiny", dict(embed_dim=96, depths=(3, 3, 9, 3), drop_path_rate=0.1), kwargs)


@register_model
def msmlp_small(**kwargs) -> MSMLP:
    """MS-MLP-S: 50.3M params, top-1 83.4."""
    return _create_msmlp("msmlp_small", dict(embed_dim=96, depths=(3, 3, 27, 3), drop_path_rate=0.4), kwargs)


@register_model
def msmlp_base(**kwargs) -> MSMLP:
    """MS-MLP-B: 88.7M params, top-1 83.8."""
    return _create_msmlp("msmlp_base", dict(embed_dim=128, depths=(3, 3, 27, 3), drop_path_rate=0.5), kwargs)


register_with_timm(__name__)

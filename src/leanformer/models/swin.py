"""Swin Transformer.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021
(https://arxiv.org/abs/2103.14030). Reference code: microsoft/Swin-Transformer; timm's port.

Layout and state-dict keys follow timm (patch merging at the *start* of stages 1-3, `head.fc`,
index/mask buffers not persistent), so timm checkpoints load as they are; `checkpoint_filter_fn`
translates the official layout. What this file adds over both anchors:

- any input size: the image is padded to the patch size, each map to its window size, and padded
  tokens are masked out of attention, so the result does not depend on the padding;
- roll + window partition (and its reverse) is one precomputed token permutation, a single gather
  in forward and in backward instead of several copies;
- relative position bias and shift mask are added in one tensor, attention runs through
  `F.scaled_dot_product_attention`;
- `forward_intermediates`/`features_only` NCHW maps, gradient checkpointing, a FLOP counter that
  reproduces the official `flops()` at the official sizes and stays right at any other size;
- `pretrained_cfg` on every model; `swin_nano_patch2_window4_32` (a name timm lacks) is also
  registered with timm, the other names stay timm's own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._features import FeatureInfo, stage_indices
from ._layers import (
    DropPath,
    Mlp,
    check_image_batch,
    init_linear_and_norm,
    linear_drop_path_rates,
    nhwc_to_nchw,
    pad_to_multiple_nhwc,
)
from ._linear import Linear
from ._pretrained import build_variant, make_cfg
from ._registry import register_model
from ._timm import register_with_timm

__all__ = ["SwinTransformer", "checkpoint_filter_fn"]

_MASKED = -100.0  # the official code's additive mask value for token pairs in different regions


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the ((2w-1)^2, heads) bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_token_order(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Flat source index of each token in (rolled by -shift, window-partitioned) order."""
    grid = torch.arange(height * width).view(height, width)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    grid = grid.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    return grid.reshape(-1)


def window_attention_mask(height: int, width: int, valid: tuple[int, int], window: int, shift: int):
    """(nW, N, N) additive mask, or None: blocks pairs across shifted regions and padded keys.

    Regions are labelled as the official code does (three slices per axis in rolled coordinates);
    a padded token gets its own label, so real queries never attend to padding.
    """
    padded = valid != (height, width)
    if not shift and not padded:
        return None
    labels = torch.zeros(height, width)
    if shift:
        for i, hs in enumerate((slice(0, -window), slice(-window, -shift), slice(-shift, None))):
            for j, ws in enumerate((slice(0, -window), slice(-window, -shift), slice(-shift, None))):
                labels[hs, ws] = 3 * i + j
    if padded:
        pad = torch.ones(height, width, dtype=torch.bool)
        pad[: valid[0], : valid[1]] = False
        if shift:
            pad = torch.roll(pad, shifts=(-shift, -shift), dims=(0, 1))
        labels = labels + 9 * pad
    tokens = labels.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    tokens = tokens.reshape(-1, window * window)
    return (tokens[:, None, :] != tokens[:, :, None]).float() * _MASKED


class _PermuteTokens(torch.autograd.Function):
    """Gather tokens by a permutation; backward gathers by the inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse, order)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, _ = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """windows: (B, nW, N, C); mask: (nW, N, N) additive or None."""
        B, nW, N, C = windows.shape
        qkv = self.qkv(windows).view(B * nW, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            bias = (bias + mask.unsqueeze(1)).unsqueeze(0).expand(B, -1, -1, -1, -1)
            bias = bias.reshape(B * nW, self.num_heads, N, N)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(out))

    def flops(self, n_tokens: int) -> int:
        """MACs for one window of `n_tokens`, counted as the official code does."""
        c = self.dim
        return n_tokens * c * 3 * c + 2 * n_tokens * n_tokens * c + n_tokens * c * c


class SwinTransformerBlock(nn.Module):
    """LN -> (shifted) window attention -> residual; LN -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size={shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)
        self._layout_cache: dict[tuple, tuple] = {}

    def _layout(self, height: int, width: int, device: torch.device):
        """Token order, its inverse and the mask for a map size; built once per size and device."""
        key = (height, width, device)
        if key not in self._layout_cache:
            ws = self.window_size
            shift = self.shift_size if min(height, width) > ws else 0
            hp, wp = height + (-height) % ws, width + (-width) % ws
            order = window_token_order(hp, wp, ws, shift)
            mask = window_attention_mask(hp, wp, (height, width), ws, shift)
            self._layout_cache[key] = (
                order.to(device),
                torch.argsort(order).to(device),
                None if mask is None else mask.to(device),
            )
        return self._layout_cache[key]

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        order, inverse, mask = self._layout(H, W, x.device)
        if mask is not None and mask.dtype != x.dtype:
            mask = mask.to(x.dtype)
        x = pad_to_multiple_nhwc(x, ws, ws)
        hp, wp = x.shape[1], x.shape[2]
        windows = _PermuteTokens.apply(x.reshape(B, hp * wp, C), order, inverse)
        windows = self.attn(windows.view(B, -1, ws * ws, C), mask)
        x = _PermuteTokens.apply(windows.view(B, hp * wp, C), inverse, order).view(B, hp, wp, C)
        return x[:, :H, :W, :] if (hp, wp) != (H, W) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def flops(self, height: int, width: int) -> int:
        ws = self.window_size
        n_windows = math.ceil(height / ws) * math.ceil(width / ws)
        dim = self.norm1.normalized_shape[0]
        hidden = self.mlp.fc1.out_features
        return 2 * height * width * dim + n_windows * self.attn.flops(ws * ws) + 2 * height * width * dim * hidden


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> concat (4C) -> LayerNorm -> Linear(4C, 2C): halves H and W."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple_nhwc(x, 2, 2)
        B, H, W, C = x.shape
        # channel order (0,0),(1,0),(0,1),(1,1) of (row, col) offsets, as the official concat
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))

    def flops(self, height: int, width: int) -> int:
        dim = self.norm.normalized_shape[0] // 4
        return height * width * dim + (height // 2) * (width // 2) * 4 * dim * self.reduction.out_features


class SwinStage(nn.Module):
    """Optional patch merging followed by `depth` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: int, resolution: int,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float]):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        # official rule: a map no larger than the window is one unshifted window
        if resolution <= window_size:
            window_size, shift = resolution, 0
        else:
            shift = window_size // 2
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, num_heads, window_size, 0 if i % 2 == 0 else shift, mlp_ratio,
                                 qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (conv stride = kernel = patch) + LayerNorm, NHWC out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Swin Transformer backbone + classifier. Argument names are the official constructor's."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
    ):
        super().__init__()
        _validate_config(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         global_pool)
        self.in_chans, self.patch_size, self.img_size = in_chans, patch_size, img_size
        self.num_classes, self.global_pool = num_classes, global_pool
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rates = linear_drop_path_rates(drop_path_rate, list(depths))
        resolution = math.ceil(img_size / patch_size)
        stages, info = [], []
        for i, depth in enumerate(depths):
            if i > 0:
                resolution = math.ceil(resolution / 2)
            stages.append(SwinStage(dims[max(i - 1, 0)], dims[i], depth, num_heads[i], window_size, resolution,
                                    i > 0, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i]))
            info.append({"num_chs": dims[i], "reduction": patch_size * 2**i, "module": f"layers.{i}"})
        self.feature_info = FeatureInfo(info)
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Module()
        self.head.drop = nn.Dropout(drop_rate)
        self.head.fc = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters Swin trains without weight decay (matched as name substrings by trainers)."""
        return {"relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.fc = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (NCHW) -> final normalised feature map (NHWC), as timm returns it."""
        check_image_batch(x, self.in_chans, self.patch_size, type(self).__name__)
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> pooled features (`pre_logits`) or class logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head.drop(x)
        return x if pre_logits else self.head.fc(x)

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
        """Per-stage feature maps for dense tasks (timm's API).

        `indices`: stage indices, or an int n for the last n stages (default all). `norm` applies
        the final LayerNorm to the last stage's map. Returns the maps, or (final features, maps).
        """
        take = stage_indices(indices, len(self.layers), output_fmt)
        check_image_batch(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x)
        maps = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == len(self.layers) - 1 else x
                maps.append(nhwc_to_nchw(y) if output_fmt == "NCHW" else y)
            if intermediates_only and i == max(take):
                return maps
        return maps if intermediates_only else (self.norm(x), maps)

    def flops(self, img_size: int | tuple[int, int] | None = None) -> int:
        """Multiply-accumulates for one image, plus one per normalised element (the official count)."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or (self.img_size,) * 2)
        h, w = math.ceil(h / self.patch_size), math.ceil(w / self.patch_size)
        embed = self.patch_embed.proj
        total = h * w * embed.out_channels * (embed.in_channels * self.patch_size**2 + 1)
        for stage in self.layers:
            if isinstance(stage.downsample, PatchMerging):
                total += stage.downsample.flops(h, w)
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            total += sum(block.flops(h, w) for block in stage.blocks)
        total += h * w * self.num_features
        if isinstance(self.head.fc, nn.Linear):
            total += self.num_features * self.num_classes
        return total


def _validate_config(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                     global_pool) -> None:
    """Raise ValueError naming the first bad field of a Swin config."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                        ("embed_dim", embed_dim), ("window_size", window_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r}: expected an integer >= 0")
    if len(depths) == 0 or len(depths) != len(num_heads):
        raise ValueError(f"depths={list(depths)} and num_heads={list(num_heads)} must be non-empty and of equal length")
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if heads < 1 or dim % heads:
            raise ValueError(
                f"num_heads[{i}]={heads}: stage {i} has {dim} channels (embed_dim={embed_dim} * 2**{i}), "
                f"which must be divisible by its number of heads"
            )
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: expected 'avg' or ''")


_OFFICIAL_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    """Translate official (microsoft/Swin-Transformer) or timm state dicts to this model's layout.

    Official checkpoints merge patches at the end of stages 0-2 and call the classifier `head`;
    here (as in timm) merging starts stages 1-3 and the classifier is `head.fc`. Index and mask
    buffers are rebuilt, not loaded. Bias tables of another window size are resized bicubically.
    """
    official = any(_OFFICIAL_DOWNSAMPLE.match(k) and k.startswith("layers.0.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            key = _OFFICIAL_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
            if key.startswith("head.") and not key.startswith("head.fc."):
                key = "head.fc." + key[len("head."):]
        if key.endswith("relative_position_bias_table"):
            value = _resize_bias_table(value, model.get_submodule(key.rsplit(".", 1)[0]).relative_position_bias_table)
        out[key] = value
    return out


def _resize_bias_table(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bicubic resize of a ((2w-1)^2, heads) bias table to the target's window size."""
    if table.shape == target.shape or table.ndim != 2 or table.shape[1] != target.shape[1]:
        return table  # equal, or a mismatch check_state_dict will name
    src, dst = math.isqrt(table.shape[0]), math.isqrt(target.shape[0])
    if src * src != table.shape[0] or dst * dst != target.shape[0]:
        return table
    grid = table.T.reshape(1, -1, src, src)
    grid = F.interpolate(grid.float(), size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.reshape(-1, dst * dst).T.contiguous().to(table.dtype)


# swin_nano is `leanformer train`'s model for the embedded digits: the data pipeline scales them to [0, 1],
# resizes bilinearly without cropping and standardises with the train split's statistics (default split:
# seed 0, val_fraction 0.2; asserted in tests). The others follow timm's cfgs of the same variants.
_DIGITS_MEAN, _DIGITS_STD = 0.3059, 0.3765
default_cfgs = {
    "swin_nano_patch2_window4_32": make_cfg(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0,
                                            mean=(_DIGITS_MEAN,) * 3, std=(_DIGITS_STD,) * 3),
    "swin_tiny_patch4_window7_224": make_cfg(),
    "swin_small_patch4_window7_224": make_cfg(),
    "swin_base_patch4_window7_224": make_cfg(),
    "swin_base_patch4_window12_384": make_cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "swin_large_patch4_window7_224": make_cfg(),
    "swin_large_patch4_window12_384": make_cfg(input_size=(3, 384, 384), crop_pct=1.0),
}


def _create_swin(variant: str, defaults: dict, kwargs: dict) -> SwinTransformer:
    return build_variant(SwinTransformer, variant, default_cfgs[variant], {**defaults, **kwargs})


@register_model
def swin_nano_patch2_window4_32(**kwargs) -> SwinTransformer:
    """A compact Swin for small images (32px, 2px patches, 4x4 windows): `leanformer train`'s default."""
    return _create_swin("swin_nano_patch2_window4_32", dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2),
                        num_heads=(3, 6, 12), window_size=4, drop_path_rate=0.1), kwargs)


@register_model
def swin_tiny_patch4_window7_224(**kwargs) -> SwinTransformer:
    """Swin-T: 28.3M params, 4.5 GMACs, ImageNet-1K top-1 81.2 (official)."""
    return _create_swin("swin_tiny_patch4_window7_224", dict(embed_dim=96, depths=(2, 2, 6, 2),
                        num_heads=(3, 6, 12, 24), drop_path_rate=0.2), kwargs)


@register_model
def swin_small_patch4_window7_224(**kwargs) -> SwinTransformer:
    """Swin-S: 49.6M params, 8.7 GMACs, top-1 83.2."""
    return _create_swin("swin_small_patch4_window7_224", dict(embed_dim=96, depths=(2, 2, 18, 2),
                        num_heads=(3, 6, 12, 24), drop_path_rate=0.3), kwargs)


@register_model
def swin_base_patch4_window7_224(**kwargs) -> SwinTransformer:
    """Swin-B: 87.8M params, 15.4 GMACs, top-1 83.5."""
    return _create_swin("swin_base_patch4_window7_224", dict(embed_dim=128, depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32), drop_path_rate=0.5), kwargs)


@register_model
def swin_base_patch4_window12_384(**kwargs) -> SwinTransformer:
    """Swin-B at 384 with 12x12 windows: 87.9M params, 47.1 GMACs."""
    return _create_swin("swin_base_patch4_window12_384", dict(img_size=384, embed_dim=128, depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32), window_size=12, drop_path_rate=0.5), kwargs)


@register_model
def swin_large_patch4_window7_224(**kwargs) -> SwinTransformer:
    """Swin-L: 196.5M params."""
    return _create_swin("swin_large_patch4_window7_224", dict(embed_dim=192, depths=(2, 2, 18, 2),
                        num_heads=(6, 12, 24, 48), drop_path_rate=0.5), kwargs)


@register_model
def swin_large_patch4_window12_384(**kwargs) -> SwinTransformer:
    """Swin-L at 384 with 12x12 windows: 196.7M params."""
    return _create_swin("swin_large_patch4_window12_384", dict(img_size=384, embed_dim=192, depths=(2, 2, 18, 2),
                        num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.5), kwargs)


register_with_timm(__name__)

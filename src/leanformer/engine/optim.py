"""AdamW with Swin's weight-decay exclusions, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import check_real


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norms/biases/position tables trained without decay.

    As in Swin: every 1-D parameter (norm scales, biases, layer scales) and every parameter whose
    name contains one of `model.no_weight_decay()` (e.g. relative position bias tables) is excluded.
    """
    skip_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(s in name for s in skip_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer_settings(lr: float, min_lr: float, weight_decay: float, clip_grad: float | None) -> None:
    """ValueError naming the field unless lr > 0, 0 <= min_lr <= lr, weight_decay >= 0 and clip_grad > 0 or None,
    all finite real numbers (not bools): the AdamW + cosine settings every run config shares."""
    check_real("lr", lr, minimum=0, min_open=True)
    check_real("min_lr", min_lr, minimum=0)
    check_real("weight_decay", weight_decay, minimum=0)
    check_real("clip_grad", clip_grad, minimum=0, min_open=True, none="no clipping")
    if min_lr > lr:
        raise ValueError(f"min_lr={min_lr}: expected at most lr={lr}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from ~0 to `lr`, then cosine decay to `min_lr` at `total_steps`.

    A pure function of the step, so the schedule's whole state is the step counter.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

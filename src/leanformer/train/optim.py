"""AdamW with Swin's weight-decay exclusions, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import is_real


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
    """ValueError naming the field unless lr > 0, 0 <= min_lr <= lr, weight_decay >= 0 (all finite) and clip_grad is
    positive or None: the AdamW + cosine settings the run configs share."""
    for name, value in (("lr", lr), ("min_lr", min_lr), ("weight_decay", weight_decay)):
        if not is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    if lr == 0:
        raise ValueError("lr=0: expected a positive learning rate")
    if min_lr > lr:
        raise ValueError(f"min_lr={min_lr}: expected at most lr={lr}")
    if clip_grad is not None and (not is_real(clip_grad) or not clip_grad > 0):
        raise ValueError(f"clip_grad={clip_grad!r}: expected a positive number or None (no clipping)")


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

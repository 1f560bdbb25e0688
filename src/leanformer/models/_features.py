"""`features_only` models: a backbone whose forward returns its per-stage NCHW maps (timm's API)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def stage_indices(indices: int | Sequence[int] | None, n_stages: int, output_fmt: str = "NCHW") -> set[int]:
    """Validate `forward_intermediates` arguments; return the stages to keep.

    `indices` as timm takes it: None = all stages, int n = the last n, or explicit (negative ok) indices.
    """
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NHWC'")
    if indices is None:
        return set(range(n_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= n_stages:
            raise ValueError(f"indices={indices}: expected 1..{n_stages} (the last n stages)")
        return set(range(n_stages - indices, n_stages))
    take = {i % n_stages if -n_stages <= i < n_stages else i for i in indices}
    bad = [i for i in take if not 0 <= i < n_stages]
    if bad or not take:
        raise ValueError(f"indices={list(indices)}: expected stage indices in [0, {n_stages})")
    return take


class FeatureExtractor(nn.Module):
    """Wraps a backbone with `forward_intermediates`; forward returns the maps of `out_indices`.

    The backbone stays reachable as `.model`, so its state dict keys gain a `model.` prefix; load
    checkpoints into the backbone before wrapping (create_model does).
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        n_stages = len(model.feature_info)
        self.out_indices = tuple(range(n_stages) if out_indices is None else out_indices)
        bad = [i for i in self.out_indices if not -n_stages <= i < n_stages]
        if bad or not self.out_indices:
            raise ValueError(f"out_indices={list(self.out_indices)}: expected stage indices in [0, {n_stages})")
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)

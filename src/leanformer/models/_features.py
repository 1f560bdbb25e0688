"""`features_only` models: a backbone whose forward returns its per-stage NCHW maps (timm's API)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ._pretrained import cfg_for_features, set_pretrained_cfg


def stage_indices(indices: int | Sequence[int] | None, n_stages: int, output_fmt: str = "NCHW",
                  name: str = "indices") -> set[int]:
    """Validate `forward_intermediates` arguments; return the stages to keep.

    `indices` as timm takes it: None = all stages, int n = the last n, or explicit (negative ok) indices.
    `name` is the argument the error messages name.
    """
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NHWC'")
    if indices is None:
        return set(range(n_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= n_stages:
            raise ValueError(f"{name}={indices}: expected 1..{n_stages} (the last n stages)")
        return set(range(n_stages - indices, n_stages))
    take = {i % n_stages if -n_stages <= i < n_stages else i for i in indices}
    bad = [i for i in take if not 0 <= i < n_stages]
    if bad or not take:
        raise ValueError(f"{name}={list(indices)}: expected stage indices in [0, {n_stages})")
    return take


class FeatureInfo(list):
    """Per-stage `num_chs`/`reduction`/`module` dicts with timm's `FeatureInfo` accessors.

    Code written for timm backbones (`feature_info.channels()`, `.reduction()`, `.module_name()`,
    `.get_dicts()`, `.from_other()`) works unchanged: as in timm, `info` holds every stage,
    `out_indices` the selected ones, and an explicit `idx` is a stage index. As a list it holds the
    selected stages (iteration, `len`, indexing), as leanformer's `feature_info` always has, and timm's
    own feature wrappers accept it as the plain list they expect on a backbone.
    """

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int] | None = None):
        self.info = [{**stage, "index": stage.get("index", i)} for i, stage in enumerate(info)]
        self.out_indices = tuple(range(len(self.info)) if out_indices is None else out_indices)
        super().__init__(self.info[i] for i in self.out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        """`key` of each selected stage (idx None), of the stages `idx`, or of stage `idx` (an int)."""
        if idx is None:
            return [stage[key] for stage in self]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        """The stage dicts (restricted to `keys` if given), selected as `get` selects."""
        pick = (lambda stage: stage) if keys is None else (lambda stage: {k: stage[k] for k in keys})
        if idx is None:
            return [pick(stage) for stage in self]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)


class FeatureExtractor(nn.Module):
    """Wraps a backbone with `forward_intermediates`; forward returns the maps of `out_indices`.

    `out_indices` as timm takes it (None = all stages, int n = the last n, negative indices ok); the
    maps come in stage order, so `out_indices` is kept sorted to match them. The backbone stays
    reachable as `.model`, so its state dict keys gain a `model.` prefix; load checkpoints into the
    backbone before wrapping (create_model does).
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None):
        super().__init__()
        stages = getattr(model.feature_info, "info", model.feature_info)
        self.out_indices = tuple(sorted(stage_indices(out_indices, len(stages), name="out_indices")))
        self.model = model
        self.feature_info = FeatureInfo(stages, self.out_indices)
        if hasattr(model, "pretrained_cfg"):
            set_pretrained_cfg(self, cfg_for_features(model.pretrained_cfg))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)

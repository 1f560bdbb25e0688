"""The one batch convention of `leanformer.sparsity`: how a batch becomes a model call, and where its targets go.

`measure_sparsity`, `record_ffn_activity`, `train_predictors`, `evaluate_predictors` and `prosparse` all read
their batches here, so a batch that one of them accepts means the same thing to all of them:

- a dict (any Mapping, e.g. a tokenizer's BatchEncoding): keyword arguments, ``model(**batch)``; a ``labels`` key
  is passed on like any other, for a Hugging Face model's own loss;
- a tensor: the model's one positional argument, ``model(batch)``;
- a tuple or list ``(inputs, targets)``, as `prosparse`, `lm_batches` and a DataLoader of (x, y) give:
  ``model(inputs)``, or ``model(**inputs)`` when inputs is a dict; the targets never reach the model (passed
  positionally they would land in whatever its second parameter is: a Hugging Face model's attention mask).
  ``(inputs,)`` is inputs alone. A model that needs several arguments takes them as a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelCall", "split_batch", "split_pair", "to_device"]


@dataclass(frozen=True)
class ModelCall:
    """A batch split by the convention: ``model(*args, **kwargs)``, and the targets kept aside (None if none)."""

    args: tuple
    kwargs: dict
    targets: Any = None

    def run(self, model: torch.nn.Module, **extra: Any) -> Any:
        """The model call, with ``extra`` keyword arguments (e.g. ``labels``, ``use_cache``) added."""
        return model(*self.args, **self.kwargs, **extra)

    def padding_mask(self, key: str | None) -> torch.Tensor | None:
        """The bool (nonzero = token) mask under keyword ``key`` (HF's ``attention_mask``), or None if absent."""
        mask = self.kwargs.get(key) if key is not None else None
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(f"batch[{key!r}] must be a tensor (nonzero = token, 0 = padding), "
                             f"got {type(mask).__name__}")
        return None if mask is None else mask.to(torch.bool)


def _call_on(inputs: Any, targets: Any = None) -> ModelCall:
    """The call of a batch's inputs: a dict as keyword arguments, a tensor as the positional argument."""
    if isinstance(inputs, Mapping):
        return ModelCall((), dict(inputs), targets)
    if isinstance(inputs, torch.Tensor):
        return ModelCall((inputs,), {}, targets)
    raise ValueError(f"the inputs of an (inputs, targets) batch must be a tensor or a dict of keyword arguments, "
                     f"got {type(inputs).__name__}")


def split_batch(batch: Any) -> ModelCall:
    """``batch`` as a model call and its targets, by the convention in this module's docstring."""
    if isinstance(batch, (Mapping, torch.Tensor)):
        return _call_on(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise ValueError(f"a tuple/list batch is (inputs, targets) or (inputs,), got {len(batch)} items; pass "
                             "several model arguments as a dict of keyword arguments")
        return _call_on(*batch)
    raise ValueError(f"each batch must be a tensor, a tuple/list (inputs, targets) or a dict of keyword arguments, "
                     f"got {type(batch).__name__}")


def split_pair(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch that must have targets (a task loss needs them); inputs checked as above."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], torch.Tensor):
        if not isinstance(batch, (tuple, list)):
            got = type(batch).__name__
        else:
            got = f"{len(batch)} items" if len(batch) != 2 else f"targets of type {type(batch[1]).__name__}"
        raise ValueError(f"each batch must be an (inputs, targets) pair with a tensor of targets (inputs a tensor "
                         f"or a dict of keyword arguments), got {got}")
    _call_on(*batch)
    return batch[0], batch[1]


def to_device(inputs: Any, device: torch.device) -> Any:
    """A batch's inputs on ``device``: a tensor, or a dict with its tensor values moved (others kept)."""
    if isinstance(inputs, Mapping):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    return inputs.to(device)

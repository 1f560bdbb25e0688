"""Saved-tensor accounting: how many bytes autograd keeps for backward, in total and per module.

`with saved_activation_bytes(model) as report: loss = model(x).sum()` records every tensor saved
for backward during the block: parameters are excluded (they exist anyway), a storage kept by
several ops is counted once, and tensors stored compressed by `compress_activations` are counted
at their compressed size (the compressor reports them here, since its own hooks take precedence).
"""

from __future__ import annotations

import contextvars
import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._tracking import ModuleTracker


@dataclass
class SavedActivationReport:
    """Bytes kept for backward. `stored` is what is held; `original` what exact storage would hold."""

    stored_bytes: int = 0
    original_bytes: int = 0
    tensors: int = 0
    per_module: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: {"stored": 0,
                                                                                              "original": 0}))
    _seen: dict = field(default_factory=dict, repr=False)

    def record(self, module: str, key, stored: int, original: int, owner: object) -> None:
        """Count one kept object once: `key` identifies it (a storage's address, a compressed copy's id) while
        `owner` (the storage, the compressed copy) lives. Once the owner is freed, a new object may reuse its
        address or id: it is counted anew, not taken for the freed one."""
        seen = self._seen.get(key)
        if seen is not None and seen() is not None:
            return
        self._seen[key] = weakref.ref(owner)
        self.stored_bytes += stored
        self.original_bytes += original
        self.tensors += 1
        entry = self.per_module[module or "<root>"]
        entry["stored"] += stored
        entry["original"] += original

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0

    def to_dict(self) -> dict:
        return {"stored_bytes": self.stored_bytes, "original_bytes": self.original_bytes, "tensors": self.tensors,
                "ratio": self.ratio, "per_module": {k: dict(v) for k, v in self.per_module.items()}}


_active_report: contextvars.ContextVar[SavedActivationReport | None] = contextvars.ContextVar(
    "leanformer_saved_activation_report", default=None
)


def active_report() -> SavedActivationReport | None:
    """The report of the innermost `saved_activation_bytes` block, if any (used by the compressor)."""
    return _active_report.get()


def storage_key(x: torch.Tensor):
    return (x.device, x.untyped_storage().data_ptr())


def parameter_storages(model: nn.Module | None) -> set:
    if model is None:
        return set()
    return {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}


@contextmanager
def saved_activation_bytes(model: nn.Module | None = None) -> Iterator[SavedActivationReport]:
    """Record what autograd saves for backward inside the block.

    With `model`, bytes are attributed to the innermost running module (by qualified name) and the
    model's parameters and buffers are excluded by storage; without it only leaf tensors that
    require grad are treated as parameters.
    """
    report = SavedActivationReport()
    params = parameter_storages(model)
    tracker = ModuleTracker(model) if model is not None else None

    def pack(x: torch.Tensor) -> torch.Tensor:
        is_param = storage_key(x) in params if model is not None else (x.is_leaf and x.requires_grad)
        if not is_param:
            nbytes = x.untyped_storage().nbytes()
            module = tracker.current[0] if tracker is not None else ""
            report.record(module, ("raw", storage_key(x)), nbytes, nbytes, x.untyped_storage())
        return x

    token = _active_report.set(report)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield report
    finally:
        _active_report.reset(token)
        if tracker is not None:
            tracker.remove()

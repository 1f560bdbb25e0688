"""Training-free activation sparsity: magnitude thresholds calibrated on a little text (TEAL, CATS).

Models that were never ReLU-trained (SiLU/GELU LLaMA, Mistral, Qwen, Gemma) still have many small activations.
Zeroing those below a threshold costs little accuracy and lets a decoder skip the weights they multiply:

- **TEAL** (Liu et al., ICLR 2025): the input of every Linear inside the blocks; entries with |x| <= t are zero.
  Linears that read the same tensor (q/k/v, gate/up) share one threshold, so one mask serves them all.
  `InputSparseLinear` is that Linear: the same parameters and state_dict keys, its input masked.
- **CATS** (Lee et al., 2024): the output of each FFN's activation, |act(x)| <= t -> 0, set as
  ``Sequential(act, MagnitudeThreshold(t))``; up and down then need only the surviving units.

`calibrate_thresholds` sets them in place for a target *model-wide* sparsity: the fraction of the blocks' weight
reads a decoder skips (each group's zeroed fraction weighted by the weights it multiplies). ``allocation="uniform"``
gives every group the target (TEAL's baseline). ``"greedy"`` (default) gives each *kind* of group (the same
projection in every block: q/k/v, o, gate/up, down for a LLaMA) its own level, chosen as TEAL's greedy search
does but on the model's loss rather than a block's output error: starting dense, each step tries raising every
kind by ``step`` and keeps the raise that costs the least calibration loss per weight skipped, with all levels
chosen so far applied (so interactions count), until the target is met; the last step is shortened to land on
it. One step is one forward of the first calibration batch per kind (keep that batch small: a few hundred
tokens). On SmolLM2-135M the gate/up input is by far the most sensitive (40% there alone: +12.6% perplexity;
q/k/v +0.1%, o +0.5%, down +1.4%), which a uniform level ignores. Two cheaper allocations were tried and
discarded: per-group levels from each group's loss measured alone (the sum of 120 small costs is not the cost
of their sum: +76% perplexity at 40%) and an empirical-Fisher estimate (worse than uniform).

Thresholds are quantiles of magnitudes measured on the dense model; once upstream layers are thresholded too, and on
other text, the zeroed fractions differ a little: `threshold_sparsity` measures them. `save_pretrained` /
`load_pretrained` keep the thresholds; `fast_decoder` runs them, skipping the weights of the zeroed entries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .._checks import check_real
from ._batches import split_batch
from .ffn import FFN, activation_paths, find_ffns

__all__ = ["ALLOCATIONS", "METHODS", "InputSparseLinear", "MagnitudeThreshold", "ThresholdConfig",
           "ThresholdReport", "calibrate_thresholds", "input_threshold_record", "remove_thresholds",
           "set_input_threshold", "threshold_sparsity", "thresholded"]

METHODS = ("teal", "cats")
ALLOCATIONS = ("greedy", "uniform")


class MagnitudeThreshold(nn.Module):
    """x where |x| > threshold, else 0 (CATS, applied after the FFN's own activation)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(check_real("MagnitudeThreshold.threshold", threshold, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x.abs() <= self.threshold, 0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


def thresholded(act: nn.Module, threshold: float) -> nn.Sequential:
    """What CATS sets in place of an FFN activation: Sequential(act, MagnitudeThreshold(threshold))."""
    return nn.Sequential(act, MagnitudeThreshold(threshold))


def is_thresholded(act: nn.Module) -> bool:
    return isinstance(act, nn.Sequential) and len(act) == 2 and isinstance(act[1], MagnitudeThreshold)


class InputSparseLinear(nn.Linear):
    """nn.Linear whose input entries with |x| <= threshold count as zero (TEAL); same parameters, same keys."""

    threshold: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.masked_fill(x.abs() <= self.threshold, 0), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


def set_input_threshold(model: nn.Module, path: str, threshold: float | None) -> None:
    """Make the Linear at ``path`` an `InputSparseLinear` at ``threshold`` (None: a plain Linear again), sharing
    its parameters."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, attr)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{path} is a {type(linear).__name__}: input thresholds apply to nn.Linear")
    cls = nn.Linear if threshold is None else InputSparseLinear
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight, linear.bias
    new.train(linear.training)
    if threshold is not None:
        new.threshold = float(check_real(f"threshold of {path}", threshold, 0))
    setattr(parent, attr, new)


def input_threshold_record(model: nn.Module) -> dict[str, float]:
    """Linear path -> TEAL input threshold, for every `InputSparseLinear` of ``model``."""
    return {name: m.threshold for name, m in model.named_modules() if isinstance(m, InputSparseLinear)}


@dataclass(frozen=True)
class ThresholdConfig:
    """How `calibrate_thresholds` sparsifies.

    method: "teal" (inputs of every Linear in the blocks) or "cats" (FFN activation outputs).
    sparsity: target model-wide fraction of the blocks' weight reads skipped, in [0, 1).
    allocation: "greedy" (per-group levels by estimated loss, see the module docstring) or "uniform".
    step: how much greedy raises a kind's level per step (smaller: finer, more forwards).
    max_level: the highest level greedy gives a kind.
    max_samples: magnitudes kept per group to place the thresholds (a random subset beyond it).
    """

    method: str = "teal"
    sparsity: float = 0.4
    allocation: str = "greedy"
    step: float = 0.1
    max_level: float = 0.9
    max_samples: int = 1 << 18

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ThresholdConfig.method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"ThresholdConfig.allocation={self.allocation!r}: expected one of "
                             f"{', '.join(ALLOCATIONS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or \
                not 0 <= self.sparsity < 1:
            raise ValueError(f"ThresholdConfig.sparsity={self.sparsity!r}: expected a fraction in [0, 1)")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not 0 < self.step <= 0.5:
            raise ValueError(f"ThresholdConfig.step={self.step!r}: expected a fraction in (0, 0.5]")
        if isinstance(self.max_level, bool) or not isinstance(self.max_level, (int, float)) or \
                not self.sparsity <= self.max_level < 1:
            raise ValueError(f"ThresholdConfig.max_level={self.max_level!r}: expected a fraction in "
                             f"[sparsity, 1) (sparsity is {self.sparsity})")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 64:
            raise ValueError(f"ThresholdConfig.max_samples={self.max_samples!r}: expected an integer >= 64")


@dataclass
class ThresholdReport:
    """What `calibrate_thresholds` set: per group its members, zeroed fraction (on the calibration batches),
    threshold and weight count; the model-wide sparsity reached and the calibration loss before and after."""

    method: str
    allocation: str
    target: float
    sparsity: float
    loss_dense: float
    loss_sparse: float
    groups: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "allocation": self.allocation, "target": self.target,
                "sparsity": self.sparsity, "loss_dense": self.loss_dense, "loss_sparse": self.loss_sparse,
                "groups": self.groups}


@dataclass
class _Group:
    """Modules sparsified together: TEAL, Linears reading one tensor; CATS, one FFN activation."""

    members: list[str]
    weights: int  # elements of the weights whose reads the zeroed entries skip
    magnitudes: list[torch.Tensor] = field(default_factory=list)

    def thresholds(self, levels: torch.Tensor) -> torch.Tensor:
        """The threshold zeroing each fraction of ``levels`` of the calibration magnitudes (-1 for none)."""
        mags = torch.cat(self.magnitudes).double().sort().values
        count = torch.clamp((levels * len(mags)).round().long(), 0, len(mags))
        return torch.where(count > 0, mags[(count - 1).clamp(min=0)], torch.full_like(levels, -1.0))

    def threshold(self, level: float) -> float:
        return float(self.thresholds(torch.tensor([level], dtype=torch.float64))[0])


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears inside the model's repeated blocks (a path with a numeric part), not its output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
            and any(part.isdigit() for part in name.split("."))}


def _teal_groups(model: nn.Module, batch: object) -> dict[str, _Group]:
    """Block Linears grouped by the input tensor they read in one forward (q/k/v together, gate/up together)."""
    linears = _block_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside numbered blocks for TEAL to sparsify "
                         "(its projections are other modules, e.g. GPT-2's Conv1D or 1x1 Conv2d, not supported yet); "
                         "method='cats' thresholds FFN activations instead")
    seen: dict[int, list[str]] = {}
    alive = []  # the inputs themselves, so that no id is reused within the forward

    def note(name: str, tensor: torch.Tensor) -> None:
        seen.setdefault(id(tensor), []).append(name)
        alive.append(tensor)

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: note(name, args[0]))
               for name, m in linears.items()]
    try:
        with torch.no_grad():
            split_batch(batch).run(model)
    finally:
        for h in handles:
            h.remove()
    groups = {}
    for members in seen.values():
        members = sorted(set(members), key=list(linears).index)
        groups[members[0]] = _Group(members, sum(linears[n].weight.numel() for n in members))
    return groups


def _cats_skipped_weights(ffn: FFN) -> int:
    """Weight elements a CATS-zeroed unit of ``ffn`` lets a decoder skip: its rows of down, and of up if gated."""
    return sum(m.weight.numel() for m in [ffn.down] + ([ffn.up] if ffn.gate is not None else []))


def _cats_groups(model: nn.Module) -> dict[str, _Group]:
    groups = {}
    for path, ffn in activation_paths(model, find_ffns(model)):
        if not isinstance(getattr(ffn.act_parent, ffn.act_attr), nn.Module):
            raise ValueError(f"{path} is a plain function: CATS needs the FFN activation to be a module")
        groups[path] = _Group([path], _cats_skipped_weights(ffn))
    if not groups:
        raise ValueError(f"{type(model).__name__}: no FFN found for CATS (see leanformer.sparsity.find_ffns)")
    return groups


def _run_hooked(model: nn.Module, batches: Iterable, handles: list) -> None:
    """Forward every batch without gradients, then remove the hooks ``handles`` (also on error)."""
    try:
        with torch.no_grad():
            for batch in batches:
                split_batch(batch).run(model)
    finally:
        for h in handles:
            h.remove()


def _collect(model: nn.Module, batches: list, groups: dict[str, _Group], method: str, max_samples: int,
             generator: torch.Generator) -> None:
    """Fill each group's magnitudes (TEAL: of its input; CATS: of the activation output) over ``batches``."""
    per_batch = max(1, max_samples // len(batches))
    seen: set[str] = set()

    def keep(key: str, tensor: torch.Tensor) -> None:
        x = tensor.detach().flatten()
        if len(x) > per_batch:
            x = x[torch.randperm(len(x), generator=generator)[:per_batch]]
        groups[key].magnitudes.append(x.abs().float())
        seen.add(key)

    handles = []
    for key, group in groups.items():
        module = model.get_submodule(group.members[0])
        if method == "teal":
            handles.append(module.register_forward_pre_hook(lambda _m, args, key=key: keep(key, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out, key=key: keep(key, out)))
    _run_hooked(model, batches, handles)
    missing = set(groups) - seen
    if missing:
        raise ValueError(f"calibration: {sorted(missing)[0]} was not reached by the model's forward")


def kind_of(key: str) -> str:
    """A group's kind: its path with the block numbers replaced by '*' (the same projection in every block)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", key)


def _greedy(model: nn.Module, groups: dict[str, _Group], config: ThresholdConfig, batch: object,
            loss_fn: Callable, progress: bool) -> dict[str, float]:
    """Per group its level: greedy over kinds on the loss of ``batch`` (see the module docstring)."""
    kinds: dict[str, list[str]] = {}
    for key in groups:
        kinds.setdefault(kind_of(key), []).append(key)
    total = sum(g.weights for g in groups.values())
    share = {kind: sum(groups[k].weights for k in keys) / total for kind, keys in kinds.items()}
    level = dict.fromkeys(kinds, 0.0)
    loss = _mean_loss(model, [batch], loss_fn)
    reached = 0.0
    bar = tqdm(desc="greedy thresholds", unit="forward", disable=not progress, leave=False)
    while reached < config.sparsity - 1e-9:
        best, best_rate, best_loss = None, math.inf, loss
        for kind, keys in kinds.items():
            if level[kind] + 1e-9 >= config.max_level:
                continue
            trial = min(config.max_level, level[kind] + config.step)
            _set_level(model, groups, keys, trial, config.method)
            trial_loss = _mean_loss(model, [batch], loss_fn)
            _set_level(model, groups, keys, level[kind], config.method)
            bar.update()
            rate = (trial_loss - loss) / ((trial - level[kind]) * share[kind])
            if rate < best_rate:
                best, best_rate, best_loss = kind, rate, trial_loss
        if best is None:
            break
        raise_by = min(config.max_level - level[best], config.step, (config.sparsity - reached) / share[best])
        level[best] += raise_by
        reached += raise_by * share[best]
        _set_level(model, groups, kinds[best], level[best], config.method)
        loss = best_loss if raise_by == config.step else _mean_loss(model, [batch], loss_fn)
    bar.close()
    _clear(model)
    return {key: level[kind] for kind, keys in kinds.items() for key in keys}


def _set_level(model: nn.Module, groups: dict[str, _Group], keys: list[str], level: float, method: str) -> None:
    """Threshold the groups ``keys`` at ``level`` (0: dense again)."""
    for key in keys:
        group = groups[key]
        threshold = group.threshold(level) if level > 0 else None
        if method == "teal":
            for path in group.members:
                set_input_threshold(model, path, threshold if threshold is not None and threshold >= 0 else None)
        else:
            parent_name, _, attr = key.rpartition(".")
            parent = model.get_submodule(parent_name)
            current = getattr(parent, attr)
            own = current[0] if is_thresholded(current) else current
            setattr(parent, attr, own if threshold is None or threshold < 0 else thresholded(own, threshold))


def _clear(model: nn.Module) -> bool:
    """Remove thresholds a previous calibration set, so magnitudes are measured on the dense model; whether there
    were any."""
    paths = list(input_threshold_record(model))
    for path in paths:
        set_input_threshold(model, path, None)
    found = bool(paths)
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if is_thresholded(child):
                setattr(module, attr, child[0])
                found = True
    return found


def remove_thresholds(model: nn.Module) -> nn.Module:
    """Undo `calibrate_thresholds`, in place; return ``model``: plain Linears and FFN activations again (the same
    parameters), and a Hugging Face config without the thresholds' record. ValueError if none was set."""
    if not _clear(model):
        raise ValueError(f"{type(model).__name__} has no TEAL/CATS thresholds to remove")
    from .pretrained import sync_hf_config  # imported here: pretrained builds on this module

    sync_hf_config(model)
    return model


def _mean_loss(model: nn.Module, batches: Iterable, loss_fn: Callable) -> float:
    with torch.no_grad():
        losses = [float(loss_fn(model, b)) for b in batches]
    return sum(losses) / len(losses)


def calibrate_thresholds(model: nn.Module, batches: Iterable, config: ThresholdConfig | None = None,
                         loss_fn: Callable | None = None, seed: int = 0, progress: bool = False) -> ThresholdReport:
    """Set TEAL or CATS thresholds on ``model`` in place for ``config.sparsity`` model-wide (see module docstring).

    ``batches``: a few calibration batches by the convention of `leanformer.sparsity` (for a causal LM,
    ``(inputs, targets)`` from `lm_eval_batches`); ``loss_fn(model, batch)`` defaults to the model's task loss
    (`prosparse.task_loss_for`). Thresholds set earlier are removed first; ``progress`` shows a bar over the
    greedy search's forwards of the first batch. Returns what was set.
    """
    from .prosparse_training import task_loss_for  # imported here: prosparse imports the whole training loop

    config = config or ThresholdConfig()
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_thresholds: expected at least one calibration batch")
    loss_fn = loss_fn or task_loss_for(model)
    was_training = model.training
    model.eval()
    _clear(model)
    groups = _teal_groups(model, batches[0]) if config.method == "teal" else _cats_groups(model)
    _collect(model, batches, groups, config.method, config.max_samples, torch.Generator().manual_seed(seed))
    loss_dense = _mean_loss(model, batches, loss_fn)
    levels = _greedy(model, groups, config, batches[0], loss_fn, progress) if config.allocation == "greedy" \
        else dict.fromkeys(groups, float(config.sparsity))
    for key, level in levels.items():
        _set_level(model, groups, [key], level, config.method)
    loss_sparse = _mean_loss(model, batches, loss_fn)
    model.train(was_training)
    from .pretrained import sync_hf_config  # imported here: pretrained builds on this module

    sync_hf_config(model)  # a plain from_pretrained of a saved copy now fails instead of dropping the thresholds
    total = sum(g.weights for g in groups.values())
    reached = sum(levels[k] * g.weights for k, g in groups.items()) / total
    return ThresholdReport(config.method, config.allocation, float(config.sparsity), reached, loss_dense,
                           loss_sparse, {k: {"members": g.members, "sparsity": levels[k],
                                             "threshold": g.threshold(levels[k]) if levels[k] > 0 else None,
                                             "weights": g.weights} for k, g in groups.items()})


def threshold_sparsity(model: nn.Module, batches: Iterable) -> dict:
    """Measured on ``batches``: per thresholded module (each `InputSparseLinear`; each CATS activation) the fraction
    of entries it zeroes, and ``model_wide``, the fraction of the blocks' Linear weight reads they skip (TEAL: a
    zeroed input skips its column of the weight; CATS: a zeroed unit skips its rows of up and down)."""
    skipped_by = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, InputSparseLinear)}
    for path, ffn in activation_paths(model, find_ffns(model)):
        if is_thresholded(getattr(ffn.act_parent, ffn.act_attr)):
            skipped_by[path] = _cats_skipped_weights(ffn)
    counts = {name: [0, 0] for name in skipped_by}

    def count(name: str, tensor: torch.Tensor, threshold: float) -> None:
        counts[name][0] += int((tensor.abs() <= threshold).sum())
        counts[name][1] += tensor.numel()

    handles = []
    for name in skipped_by:
        module = model.get_submodule(name)
        counted = module if isinstance(module, InputSparseLinear) else module[1]  # the Linear, or the CATS threshold
        handles.append(counted.register_forward_pre_hook(lambda m, args, name=name: count(name, args[0], m.threshold)))
    _run_hooked(model, batches, handles)
    fractions = {name: zero / total if total else 0.0 for name, (zero, total) in counts.items()}
    block_weights = sum(m.weight.numel() for m in _block_linears(model).values())
    skipped = sum(fractions[name] * weights for name, weights in skipped_by.items())
    return {"modules": fractions, "model_wide": skipped / block_weights if block_weights else 0.0}

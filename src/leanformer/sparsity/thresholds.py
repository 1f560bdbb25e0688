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
gives every group the target (TEAL's baseline); ``"greedy"`` (default) gives each group its own level: the
calibration loss is measured with each group alone sparsified at a few levels (``probe_levels``; one forward of
the first calibration batch per group and level, interpolated in between), and a greedy knapsack raises, one step
at a time, the level whose next step costs least loss per weight skipped, until the target is met. Like TEAL's
greedy allocation it needs no retraining; unlike it, the costs are the model's loss itself, so levels are traded
across layers, not only within a block. (An empirical-Fisher estimate of the same costs, one backward pass
instead of the probes, was tried and allocated worse than uniform on SmolLM2-135M.)

Thresholds are quantiles of magnitudes measured on the dense model; once upstream layers are thresholded too, and on
other text, the zeroed fractions differ a little: `threshold_sparsity` measures them. `save_pretrained` /
`load_pretrained` keep the thresholds; `fast_decoder` runs them, skipping the weights of the zeroed entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .._checks import check_real
from ._batches import split_batch
from .ffn import find_ffns

__all__ = ["ALLOCATIONS", "METHODS", "InputSparseLinear", "MagnitudeThreshold", "ThresholdConfig",
           "ThresholdReport", "calibrate_thresholds", "input_threshold_record", "set_input_threshold",
           "threshold_sparsity", "thresholded"]

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
    step: granularity of the greedy levels.
    probe_levels: the levels at which greedy measures each group's loss (more: better allocation, slower).
    max_samples: magnitudes kept per group to place the thresholds (a random subset beyond it).
    """

    method: str = "teal"
    sparsity: float = 0.4
    allocation: str = "greedy"
    step: float = 0.025
    probe_levels: tuple = (0.25, 0.5, 0.75, 0.9)
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
        if not isinstance(self.probe_levels, tuple) or not self.probe_levels or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in self.probe_levels) \
                or list(self.probe_levels) != sorted(set(self.probe_levels)):
            raise ValueError(f"ThresholdConfig.probe_levels={self.probe_levels!r}: expected a non-empty increasing "
                             "tuple of fractions in (0, 1)")
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
    probed: dict[float, float] = field(default_factory=dict)  # level -> calibration loss increase, this group alone

    def thresholds(self, levels: torch.Tensor) -> torch.Tensor:
        """The threshold zeroing each fraction of ``levels`` of the calibration magnitudes (-1 for none)."""
        mags = torch.cat(self.magnitudes).double().sort().values
        count = torch.clamp((levels * len(mags)).round().long(), 0, len(mags))
        return torch.where(count > 0, mags[(count - 1).clamp(min=0)], torch.full_like(levels, -1.0))

    def costs(self, levels: torch.Tensor) -> torch.Tensor:
        """Loss increase at each level, interpolated between the probes (0 at level 0), never decreasing."""
        xs = torch.tensor([0.0, *self.probed], dtype=torch.float64)
        ys = torch.tensor([0.0, *self.probed.values()], dtype=torch.float64).clamp(min=0).cummax(0).values
        slope_end = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        at = torch.searchsorted(xs, levels.clamp(max=float(xs[-1])), right=True).clamp(1, len(xs) - 1)
        inside = ys[at - 1] + (ys[at] - ys[at - 1]) * (levels - xs[at - 1]) / (xs[at] - xs[at - 1])
        beyond = ys[-1] + slope_end.clamp(min=0) * (levels - xs[-1])  # past the last probe: its slope continues
        return torch.where(levels > xs[-1], beyond, inside)


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears inside the model's repeated blocks (a path with a numeric part), not its output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
            and any(part.isdigit() for part in name.split("."))}


def _teal_groups(model: nn.Module, batch: object) -> dict[str, _Group]:
    """Block Linears grouped by the input tensor they read in one forward (q/k/v together, gate/up together)."""
    linears = _block_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside numbered blocks for TEAL to sparsify")
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


def _cats_groups(model: nn.Module) -> dict[str, _Group]:
    groups = {}
    names = {id(module): name for name, module in model.named_modules()}
    for ffn in find_ffns(model):
        parent = names[id(ffn.act_parent)]
        path = f"{parent}.{ffn.act_attr}" if parent else ffn.act_attr
        if not isinstance(getattr(ffn.act_parent, ffn.act_attr), nn.Module):
            raise ValueError(f"{path} is a plain function: CATS needs the FFN activation to be a module")
        skipped = [ffn.down] + ([ffn.up] if ffn.gate is not None else [])
        groups[path] = _Group([path], sum(m.weight.numel() for m in skipped))
    if not groups:
        raise ValueError(f"{type(model).__name__}: no FFN found for CATS (see leanformer.sparsity.find_ffns)")
    return groups


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
    try:
        with torch.no_grad():
            for batch in batches:
                split_batch(batch).run(model)
    finally:
        for h in handles:
            h.remove()
    missing = set(groups) - seen
    if missing:
        raise ValueError(f"calibration: {sorted(missing)[0]} was not reached by the model's forward")


def _probe(model: nn.Module, groups: dict[str, _Group], config: ThresholdConfig, batch: object,
           loss_fn: Callable, progress: bool) -> float:
    """Each group's loss increase on ``batch`` at every probe level, the others dense; the dense loss."""
    dense = _mean_loss(model, [batch], loss_fn)
    levels = torch.tensor(config.probe_levels, dtype=torch.float64)
    bar = tqdm(total=len(groups) * len(levels), desc="probing thresholds", unit="forward", disable=not progress,
               leave=False)
    for key, group in groups.items():
        for level, threshold in zip(config.probe_levels, group.thresholds(levels).tolist(), strict=True):
            _apply(model, {key: group}, {key: (level, threshold)}, config.method)
            group.probed[level] = _mean_loss(model, [batch], loss_fn) - dense
            _clear(model)
            bar.update()
    bar.close()
    return dense


def _allocate(groups: dict[str, _Group], config: ThresholdConfig) -> dict[str, tuple[float, float]]:
    """Per group (zeroed fraction, threshold) meeting the target model-wide sparsity."""
    total = sum(g.weights for g in groups.values())
    if config.allocation == "uniform":
        level = torch.tensor([config.sparsity], dtype=torch.float64)
        return {key: (config.sparsity, float(g.thresholds(level)[0])) for key, g in groups.items()}
    steps = int(math.floor(0.999 / config.step))
    levels = torch.arange(steps + 1, dtype=torch.float64) * config.step
    costs = {key: g.costs(levels) for key, g in groups.items()}
    at = dict.fromkeys(groups, 0)
    reached = 0.0
    while reached < config.sparsity - 1e-9:
        best, best_rate = None, math.inf
        for key, group in groups.items():
            if at[key] < steps:
                rate = float(costs[key][at[key] + 1] - costs[key][at[key]]) / group.weights
                if rate < best_rate:
                    best, best_rate = key, rate
        if best is None:
            break
        at[best] += 1
        reached += config.step * groups[best].weights / total
    return {key: (float(levels[at[key]]), float(groups[key].thresholds(levels[at[key]:at[key] + 1])[0]))
            for key in groups}


def _apply(model: nn.Module, groups: dict[str, _Group], choice: dict[str, tuple[float, float]], method: str) -> None:
    for key, group in groups.items():
        level, threshold = choice[key]
        if level <= 0 or threshold < 0:
            continue
        if method == "teal":
            for path in group.members:
                set_input_threshold(model, path, threshold)
        else:
            parent_name, _, attr = key.rpartition(".")
            parent = model.get_submodule(parent_name)
            current = getattr(parent, attr)
            setattr(parent, attr, thresholded(current[0] if is_thresholded(current) else current, threshold))


def _clear(model: nn.Module) -> None:
    """Remove thresholds a previous calibration set, so magnitudes are measured on the dense model."""
    for path in input_threshold_record(model):
        set_input_threshold(model, path, None)
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if is_thresholded(child):
                setattr(module, attr, child[0])


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
    greedy probes (groups x probe levels forwards of the first batch). Returns what was set.
    """
    from .prosparse import task_loss_for  # imported here: prosparse imports the whole training loop

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
    if config.allocation == "greedy":
        _probe(model, groups, config, batches[0], loss_fn, progress)
    loss_dense = _mean_loss(model, batches, loss_fn)
    choice = _allocate(groups, config)
    _apply(model, groups, choice, config.method)
    loss_sparse = _mean_loss(model, batches, loss_fn)
    model.train(was_training)
    from .pretrained import sync_hf_config  # imported here: pretrained builds on this module

    sync_hf_config(model)  # a plain from_pretrained of a saved copy now fails instead of dropping the thresholds
    total = sum(g.weights for g in groups.values())
    reached = sum(choice[k][0] * g.weights for k, g in groups.items()) / total
    return ThresholdReport(config.method, config.allocation, float(config.sparsity), reached, loss_dense,
                           loss_sparse, {k: {"members": g.members, "sparsity": choice[k][0],
                                             "threshold": choice[k][1], "weights": g.weights}
                                         for k, g in groups.items()})


def threshold_sparsity(model: nn.Module, batches: Iterable) -> dict:
    """Measured on ``batches``: per thresholded module (each `InputSparseLinear`; each CATS activation) the fraction
    of entries it zeroes, and ``model_wide``, the fraction of the blocks' Linear weight reads they skip (TEAL: a
    zeroed input skips its column of the weight; CATS: a zeroed unit skips its rows of up and down)."""
    skipped_by = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, InputSparseLinear)}
    names = {id(module): name for name, module in model.named_modules()}
    for ffn in find_ffns(model):
        parent = names[id(ffn.act_parent)]
        path = f"{parent}.{ffn.act_attr}" if parent else ffn.act_attr
        if is_thresholded(getattr(ffn.act_parent, ffn.act_attr)):
            skipped_by[path] = sum(m.weight.numel() for m in [ffn.down] + ([ffn.up] if ffn.gate is not None else []))
    counts = {name: [0, 0] for name in skipped_by}

    def count(name: str, tensor: torch.Tensor, threshold: float) -> None:
        counts[name][0] += int((tensor.abs() <= threshold).sum())
        counts[name][1] += tensor.numel()

    handles = []
    for name in skipped_by:
        module = model.get_submodule(name)
        counted = module if isinstance(module, InputSparseLinear) else module[1]  # the Linear, or the CATS threshold
        handles.append(counted.register_forward_pre_hook(lambda m, args, name=name: count(name, args[0], m.threshold)))
    try:
        with torch.no_grad():
            for batch in batches:
                split_batch(batch).run(model)
    finally:
        for h in handles:
            h.remove()
    fractions = {name: zero / total if total else 0.0 for name, (zero, total) in counts.items()}
    block_weights = sum(m.weight.numel() for m in _block_linears(model).values())
    skipped = sum(fractions[name] * weights for name, weights in skipped_by.items())
    return {"modules": fractions, "model_wide": skipped / block_weights if block_weights else 0.0}

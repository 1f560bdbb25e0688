"""Put SMoRA adapters into any model (`add_smora`), switch them off for a while, and see how they route."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .._projections import layer_kind
from .._targets import selects
from .._timing import time_interleaved
from .config import ALL_LINEAR, SMoRAConfig
from .layer import RoutingContext, SMoRALinear, attach_root, dense_adapter, feature_sizes, gather_adapter

__all__ = ["add_smora", "choose_compute", "disable_adapters", "remove_smora", "routing_report", "smora_layers",
           "target_names"]

# names of the output layer of common models (or of the module holding it, as timm's ``head.fc``), left out by
# "all-linear" as PEFT leaves out the output layer
_OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "head", "fc_out", "output_projection")


def smora_layers(model: nn.Module) -> dict[str, SMoRALinear]:
    """The SMoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SMoRALinear)}


def target_names(model: nn.Module, config: SMoRAConfig) -> list[str]:
    """Names of the layers ``config.target_modules`` selects (before any is wrapped): nn.Linear, Conv1D and, when
    named, 1x1 Conv2d (see `feature_sizes`). Never one inside ``modules_to_save``, which trains in full, nor one
    inside a layer that already wraps a ``base_layer`` (a PEFT LoRA layer: its lora_A/lora_B and base layer
    belong to that adapter). A named layer SMoRA cannot wrap raises ValueError saying which type it is."""
    modules = dict(model.named_modules())
    skipped = [name for name, m in modules.items() if name and (selects(config.modules_to_save, name)
                                                                 or isinstance(getattr(m, "base_layer", None),
                                                                               nn.Module))]
    inside = lambda n: any(n == s or n.startswith(s + ".") for s in skipped)
    if config.target_modules == ALL_LINEAR:
        return [n for n, m in modules.items() if n and not inside(n) and _kind_name(m) in ("Linear", "Conv1D")
                and not set(n.split(".")) & set(_OUTPUT_LAYER_NAMES)]
    matched = [n for n in modules if n and selects(config.target_modules, n)]
    leaves = [n for n in matched if not inside(n) and _is_layer(modules[n])]
    unsupported = [n for n in leaves if _kind_name(modules[n]) is None]
    if unsupported:
        try:
            feature_sizes(modules[unsupported[0]])
        except TypeError as err:
            raise ValueError(f"target_modules={config.target_modules!r} selects {unsupported[:3]}: {err}") from err
    return leaves


def add_smora(model: nn.Module, config: SMoRAConfig) -> nn.Module:
    """Wrap the targeted Linears of ``model`` in `SMoRALinear`, in place; freeze everything else except
    ``config.modules_to_save``. Returns the model.

    The model's ``attention_mask`` keyword, when given, marks the real tokens, so padding does not count as load.
    """
    if smora_layers(model):
        raise ValueError(f"{type(model).__name__} already has SMoRA adapters; one adapter per model is supported")
    names = target_names(model, config)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear (nor Conv1D or 1x1 "
                         f"Conv2d) of {type(model).__name__}; its layers are e.g. {_some_layers(model)}")
    missing = [n for n in config.modules_to_save if not any(selects((n,), m) for m, _ in model.named_modules())]
    if missing:
        raise ValueError(f"modules_to_save {missing}: no such module in {type(model).__name__}")
    context = RoutingContext()
    context.trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    paths = {}
    for name in names:
        parent, attr = _parent(model, name)
        base = getattr(parent, attr)
        if config.compute == "auto":
            out_features = feature_sizes(base)[1]
            key = (out_features, base.weight.dtype, base.weight.device)
            paths.setdefault(key, choose_compute(out_features, config, dtype=base.weight.dtype,
                                                 device=base.weight.device))
            compute = paths[key]
        else:
            compute = config.compute
        setattr(parent, attr, SMoRALinear(base, config, context, compute).train(base.training))  # keep eval()
    for name, module in model.named_modules():
        if name and selects(config.modules_to_save, name):
            module.requires_grad_(True)
    attach_root(model, context)
    return model


def remove_smora(model: nn.Module) -> nn.Module:
    """Undo `add_smora`, in place; return ``model``: every `SMoRALinear` gives its place back to the layer it
    wrapped, the routing hooks are removed and every parameter trains as it did before (``requires_grad``).
    What training changed in ``modules_to_save`` stays; the adapters themselves are dropped (save them first
    with `save_adapter`). ValueError if the model has no adapters."""
    layers = smora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SMoRA adapters to remove")
    context = next(iter(layers.values())).context
    for name, layer in layers.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.base_layer)
    for handle in context.handles:
        handle.remove()
    for name, param in model.named_parameters():
        param.requires_grad_(context.trainable.get(name, param.requires_grad))
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (the adapters add nothing and route nothing)."""
    layers = list(smora_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SMoRA adapters to disable")
    context = layers[0].context
    before, context.disabled = context.disabled, True
    try:
        yield model
    finally:
        context.disabled = before


def routing_report(model: nn.Module, reset: bool = False) -> dict[str, dict]:
    """Per SMoRA layer, since the last reset: tokens routed, each expert's share of the load, MaxVio
    ((max load - mean load) / mean load, DeepSeek's balance measure; 0 is perfect) and dead experts (never chosen).
    """
    report = {}
    for name, layer in smora_layers(model).items():
        load = layer.expert_load
        mean = load.mean().item()
        report[name] = {"tokens": layer.routed_tokens, "experts": layer.config.experts,
                        "load_share": (load / load.sum().clamp_min(1)).tolist(),
                        "max_violation": (load.max().item() - mean) / mean if mean > 0 else None,
                        "dead_experts": int((load == 0).sum()) if layer.routed_tokens else None}
        if reset:
            layer.expert_load.zero_()
            layer.routed_tokens = 0
    return report


def choose_compute(out_features: int, config: SMoRAConfig, tokens: int = 1024, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", runs: int = 5) -> str:
    """"gather" or "dense", whichever runs the B side of one adapter (forward and backward) faster here; the rest
    (A x and the router) is the same on both paths."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    h, b = make(tokens, config.r), make(out_features, config.r)
    ranks = torch.rand(tokens, config.r, generator=gen).topk(config.active_r, dim=-1).indices.to(device)
    gates = torch.rand(tokens, config.active_r, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    def step(adapter):
        return lambda: adapter(h, b, ranks, gates).sum().backward()

    timings = time_interleaved({"gather": step(gather_adapter), "dense": step(dense_adapter)}, runs, warmup=1)
    return min(timings, key=lambda path: timings[path]["median_s"])


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _some_layers(model: nn.Module, count: int = 5) -> list[str]:
    return [name for name, m in model.named_modules() if _kind_name(m) is not None][:count]


def _kind_name(module: nn.Module) -> str | None:
    """The projection kind SMoRA can wrap ``module`` as ("Linear", "Conv1D", "Conv2d" if 1x1), else None."""
    kind = layer_kind(module)
    return None if kind is None or kind.unfit(module) is not None else kind.name


def _is_layer(module: nn.Module) -> bool:
    """A leaf module with weights of its own (a layer, not a container, activation or dropout)."""
    return next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None

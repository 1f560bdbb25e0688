"""Where the FFNs of a model are: one explicit table from module class to its up/gate/down Linears.

Activation sparsity lives in the FFN intermediate output, the input of the down projection:
act(up(x)) for a plain FFN and act(gate(x)) * up(x) for a gated one (LLaMA). Every tool in this pillar
(measuring, ReLUfication, the ProSparse regulariser, sparse inference) works on the `FFN` records found
here, as PEFT finds its target modules through a per-architecture table rather than isinstance chains.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["FFN", "FFN_SPECS", "FFNSpec", "find_ffns"]


@dataclass(frozen=True)
class FFNSpec:
    """How to read one FFN from a module of one of ``classes`` (attribute paths relative to it)."""

    classes: tuple[str, ...]
    up: str
    down: str
    act: str
    gate: str | None = None


FFN_SPECS: tuple[FFNSpec, ...] = (
    # Hugging Face gated FFNs: down(act(gate(x)) * up(x))
    FFNSpec(("LlamaMLP", "MistralMLP", "Qwen2MLP"), up="up_proj", down="down_proj", act="act_fn", gate="gate_proj"),
    # Hugging Face BERT-style encoders: the FFN is split over BertIntermediate and BertOutput
    FFNSpec(("BertLayer", "RobertaLayer"), up="intermediate.dense", down="output.dense",
            act="intermediate.intermediate_act_fn"),
    # timm's Mlp (ViT, Swin, ...) and ours (leanformer Swin)
    FFNSpec(("Mlp",), up="fc1", down="fc2", act="act"),
    # leanformer MS-MLP block: the channel MLP after the shift mixer
    FFNSpec(("MixShiftBlock",), up="pwconv1", down="pwconv2", act="act"),
)


@dataclass(frozen=True)
class FFN:
    """One FFN: its container module and name, its Linears, and where its activation module is held."""

    name: str
    module: nn.Module
    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None
    act_parent: nn.Module
    act_attr: str

    @property
    def act(self) -> nn.Module:
        return getattr(self.act_parent, self.act_attr)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def hidden_features(self) -> int:
        return self.down.in_features

    def set_act(self, act: nn.Module) -> None:
        setattr(self.act_parent, self.act_attr, act)


def _resolve(module: nn.Module, path: str, what: str, owner: str) -> nn.Module:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{owner}: no attribute {path!r} for the FFN's {what} (spec does not fit this module)")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{owner}.{path} ({what}) is a {type(obj).__name__}, expected an nn.Module")
    return obj


def _record(name: str, module: nn.Module, spec: FFNSpec) -> FFN:
    owner = name or type(module).__name__
    linears = {}
    for role in ("up", "down", "gate"):
        path = getattr(spec, role)
        if path is None:
            continue
        layer = _resolve(module, path, role, owner)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{owner}.{path} ({role}) is a {type(layer).__name__}, expected nn.Linear")
        linears[role] = layer
    parent_path, _, attr = spec.act.rpartition(".")
    parent = _resolve(module, parent_path, "activation", owner) if parent_path else module
    _resolve(parent, attr, "activation", owner)
    return FFN(name, module, linears["up"], linears["down"], linears.get("gate"), parent, attr)


def find_ffns(model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> list[FFN]:
    """Every FFN of ``model`` in forward (module registration) order.

    ``specs`` replaces the built-in table (``FFN_SPECS``) for models it does not know, e.g.
    ``find_ffns(model, [FFNSpec(("MyBlock",), up="w1", down="w2", act="act")])``.
    Raises ValueError if no FFN is found, naming the model class.
    """
    table = {cls: spec for spec in (FFN_SPECS if specs is None else tuple(specs)) for cls in spec.classes}
    found = [_record(name, module, table[type(module).__name__])
             for name, module in model.named_modules() if type(module).__name__ in table]
    if not found:
        raise ValueError(
            f"no FFN found in {type(model).__name__}: known FFN classes are {sorted(table)}. Describe yours with "
            "leanformer.sparsity.FFNSpec(classes=('YourMLP',), up='fc1', down='fc2', act='act', gate=None) and "
            "pass specs=[...]")
    return found

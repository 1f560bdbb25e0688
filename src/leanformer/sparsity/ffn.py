"""Where the FFNs of a model are: an explicit table from module class to its up/gate/down projections, and a
structural fallback for the modules nobody listed.

Activation sparsity lives in the FFN intermediate output x1, the input of the down projection: act(up(x)) for a
plain FFN and act(gate(x)) * up(x) for a gated one (LLaMA). Every tool in this pillar (measuring, ReLUfication,
the ProSparse regulariser, sparse inference, predictors) works on the `FFN` records found here, as PEFT finds its
target modules through a per-architecture table rather than isinstance chains.

Three things vary between the FFNs people bring, and each lives in one table here:

- where the projections and the activation are (`FFN_SPECS`, by module class): in one module (LLaMA's
  ``LlamaMLP``), directly in the decoder layer (OPT), or split over two modules (BERT's intermediate/output);
  gate and up may be separate layers or the two halves of one (Phi-3's ``gate_up_proj``, timm's ``GluMlp``);
- what a projection layer is (`layer_kind`, by layer class): ``nn.Linear`` (weight (out, in)), transformers'
  ``Conv1D`` of GPT-2 (weight (in, out)) or a 1x1 ``nn.Conv2d`` on NCHW maps (weight (out, in, 1, 1), features in
  dimension 1). `FFN.weight` gives every one as an (out, in) view, `FFN.features_last` puts the features last;
- fused mixture-of-experts weights (3-D parameters, transformers 5's ``MixtralExperts`` and kin): one record per
  experts module (``FFNSpec.experts``), whose x1 is act(gate) * up of every (token, chosen expert) pair
  (`FFN.hook_x1`). Fused experts of a class not in the table are refused by name rather than skipped.

A model with none of the table's classes is searched by structure (`find_ffns` says what it found, with the
`FFNSpec` to pass to make it explicit); an `FFNSpec` list passed as ``specs`` replaces both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .._projections import SUPPORTED_LAYERS, LayerKind, layer_kind
from .._targets import check_targets, selects

__all__ = ["FFN", "FFN_SPECS", "ExpertRows", "FFNSpec", "LayerKind", "activation_paths", "find_ffns", "layer_kind",
           "refuse_fused_experts", "structural_spec"]

_ROLES = ("up", "down", "gate")
_HALVES = ("first", "last")


@dataclass(frozen=True)
class FFNSpec:
    """How to read one FFN from a module of one of ``classes`` (attribute paths relative to it).

    ``classes`` are class names, or ``"module.path.ClassName"`` for a name too generic to match on alone
    (DistilBERT's ``FFN``). A gated FFN computes down(act(gate(x)) * up(x)). ``fused_gate`` says that gate and
    up are the two halves of the ``up`` layer's output (``gate`` is then left None): ``"first"`` or ``"last"``
    is the half the activation is applied to, or the name of a boolean attribute of the module that is True
    when it is the last half (timm's ``GluMlp.gate_last``). ``experts`` says that ``up`` and ``down`` name the
    fused 3-D parameters of a mixture-of-experts module, (E, 2I, H) with each expert's [gate; up] rows and
    (E, H, I), that run act(gate) * up on the tokens routed to each expert (transformers 5's ``MixtralExperts``);
    ``fused_gate`` is then "first".
    """

    classes: tuple[str, ...]
    up: str
    down: str
    act: str
    gate: str | None = None
    fused_gate: str | None = None
    experts: bool = False

    def __post_init__(self) -> None:
        if self.experts and (self.gate is not None or self.fused_gate != "first" or "." in self.act):
            raise ValueError(f"FFNSpec{self.classes}: experts=True needs fused_gate='first', no gate (the experts' "
                             f"[gate; up] rows are one parameter) and an act held by the experts module itself, got "
                             f"gate={self.gate!r}, fused_gate={self.fused_gate!r}, act={self.act!r}")
        if self.fused_gate is not None and self.gate is not None:
            raise ValueError(f"FFNSpec{self.classes}: gate={self.gate!r} and fused_gate={self.fused_gate!r} "
                             "exclude each other (fused_gate: gate and up are halves of the up layer)")


_GATED_HF = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "GemmaMLP", "Gemma2MLP",
             "Gemma3MLP", "GraniteMLP", "OlmoMLP", "Olmo2MLP", "CohereMLP")

FFN_SPECS: tuple[FFNSpec, ...] = (
    # Hugging Face gated FFNs: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    FFNSpec(_GATED_HF, up="up_proj", down="down_proj", act="act_fn", gate="gate_proj"),
    # ... with gate and up fused in one Linear, gate first (Phi-3) or activated half first (ModernBERT)
    FFNSpec(("Phi3MLP",), up="gate_up_proj", down="down_proj", act="activation_fn", fused_gate="first"),
    FFNSpec(("ModernBertMLP",), up="Wi", down="Wo", act="act", fused_gate="first"),
    # T5 / mT5: wo(act(wi(x))) and its gated variant wo(act(wi_0(x)) * wi_1(x))
    FFNSpec(("T5DenseActDense", "MT5DenseActDense"), up="wi", down="wo", act="act"),
    FFNSpec(("T5DenseGatedActDense", "MT5DenseGatedActDense"), up="wi_1", down="wo", act="act", gate="wi_0"),
    # Hugging Face plain FFNs, one module each (GPT-2's c_fc/c_proj are Conv1D layers)
    FFNSpec(("GPT2MLP", "GPTNeoMLP", "GPTBigCodeMLP", "Starcoder2MLP"), up="c_fc", down="c_proj", act="act"),
    FFNSpec(("GPTNeoXMLP", "FalconMLP"), up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
    FFNSpec(("GPTJMLP", "CodeGenMLP"), up="fc_in", down="fc_out", act="act"),
    FFNSpec(("PhiMLP", "ViTMLP", "DeiTMLP"), up="fc1", down="fc2", act="activation_fn"),
    FFNSpec(("transformers.models.distilbert.modeling_distilbert.FFN",), up="lin1", down="lin2", act="activation"),
    FFNSpec(("ConvNextLayer",), up="pwconv1", down="pwconv2", act="act"),
    # OPT (Deja Vu's model): the FFN's layers sit directly in the decoder layer
    FFNSpec(("OPTDecoderLayer",), up="fc1", down="fc2", act="activation_fn"),
    # Hugging Face BERT-style encoders: the FFN is split over BertIntermediate and BertOutput
    FFNSpec(("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer"),
            up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn"),
    # timm's Mlp (ViT, Swin, ConvNeXt with conv_mlp: 1x1 Conv2d), ConvMlp and GluMlp; ours (leanformer Swin)
    FFNSpec(("Mlp", "ConvMlp"), up="fc1", down="fc2", act="act"),
    FFNSpec(("GluMlp",), up="fc1", down="fc2", act="act", fused_gate="gate_last"),
    FFNSpec(("SwiGLU",), up="fc1_x", down="fc2", act="act", gate="fc1_g"),
    # leanformer MS-MLP block: the channel MLP after the shift mixer
    FFNSpec(("MixShiftBlock",), up="pwconv1", down="pwconv2", act="act"),
    # transformers 5 fused mixture-of-experts: per expert e, down_proj[e] @ (act_fn(gate) * up), [gate; up] =
    # gate_up_proj[e] @ x, on the tokens routed to e
    FFNSpec(("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts"), up="gate_up_proj",
            down="down_proj", act="act_fn", fused_gate="first", experts=True),
)

# transformers' experts implementations (config._experts_implementation) that call the module's act_fn; the others
# (sonicmoe, deepgemm) run a fixed activation in a kernel, so a changed or hooked act_fn would not be what runs
_ACT_FN_IMPLEMENTATIONS = (None, "eager", "batched_mm", "grouped_mm")


# --- projection layers -------------------------------------------------------------------------------------------


def _projection_error(layer: object, where: str) -> str | None:
    """Why ``layer`` cannot serve as an FFN projection, naming its type; None if it can."""
    kind = layer_kind(layer) if isinstance(layer, nn.Module) else None
    if kind is None:
        return (f"{where} is a {type(layer).__name__}, expected {SUPPORTED_LAYERS} "
                f"({type(layer).__name__} is not a layer type the sparsity tools support)")
    reason = kind.unfit(layer)
    return None if reason is None else f"{where} is {reason}"


# --- FFN records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FFN:
    """One FFN: its container module and name, its projection layers, and where its activation is held.

    ``gate`` is None for a plain FFN; with ``gate_half`` ("first"/"last") gate and up are the same layer, whose
    output halves they are. ``found_by`` is "table" (`FFN_SPECS`), "specs" (passed by the caller) or "structure"
    (the fallback: the forward is not known beyond its layers). ``in_decoder``: the FFN is in the decoder of an
    encoder-decoder model, whose tokens the encoder's attention mask does not describe. ``expert_params`` names
    the (gate_up, down) 3-D parameters of fused experts (``module`` is then the experts module, and ``up``,
    ``gate`` and ``down`` are it too); None for an FFN of projection layers.
    """

    name: str
    module: nn.Module
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None
    act_parent: nn.Module
    act_attr: str
    gate_half: str | None = None
    found_by: str = "table"
    in_decoder: bool = False
    expert_params: tuple[str, str] | None = None

    @property
    def act(self) -> Callable:
        """The activation: an nn.Module, or a plain function some models hold (relufy replaces it by a module)."""
        return getattr(self.act_parent, self.act_attr)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def fused(self) -> bool:
        """Whether gate and up are the two halves of one layer's output."""
        return self.gate_half is not None

    @property
    def fused_experts(self) -> bool:
        """Whether this is a fused mixture-of-experts module: 3-D weights, one (out, in) matrix per expert."""
        return self.expert_params is not None

    @property
    def num_experts(self) -> int:
        """The number of experts (1 for an FFN of projection layers)."""
        return self.weight("down").shape[0] if self.fused_experts else 1

    @property
    def feature_dim(self) -> int:
        """Where the FFN's input and x1 hold their features: -1, or 1 for NCHW maps (1x1 Conv2d FFNs)."""
        return -1 if self.fused_experts else layer_kind(self.down).feature_dim

    @property
    def in_features(self) -> int:
        return self.weight("up").shape[-1]

    @property
    def hidden_features(self) -> int:
        return self.weight("down").shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight("down").shape[-2]

    def weight(self, role: str) -> torch.Tensor:
        """The (out, in) view of the weight of "up", "gate" or "down", whatever the layer type (and only the
        role's half of a fused gate/up layer); for fused experts an (experts, out, in) view."""
        layer = self._layer(role)
        if self.fused_experts:
            gate_up, down = self.expert_params
            return self._rows(role, getattr(self.module, down if role == "down" else gate_up))
        return self._rows(role, layer_kind(layer).weight(layer))

    def hook_x1(self, fn: Callable[[nn.Module, torch.Tensor, ExpertRows | None], None],
                when: Callable[[nn.Module], bool] | None = None) -> RemovableHandle:
        """Call ``fn(module, x1, rows)`` in every forward (those where ``when(module)`` holds, if given), x1
        features last, and return the hook's handle.

        For an FFN of layers x1 is the input of the down projection (``module``), ``rows`` None. Fused experts
        have no module that takes x1, so it is recomputed from the experts module's inputs exactly as its eager
        forward computes it (see `expert_x1`; this costs a second gate/up projection): one row per (token, chosen
        expert) pair, ``rows`` telling each row's token. Hooking the experts' act_fn instead would give
        act(gate) without up, and rows in an order that depends on the experts implementation.
        """
        if not self.fused_experts:
            def down_hook(module: nn.Module, args: tuple) -> None:
                if when is None or when(module):
                    fn(module, self.features_last(args[0]), None)

            return self.down.register_forward_pre_hook(down_hook)

        def experts_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if when is not None and not when(module):
                return  # skip the recomputation
            hidden = args[0] if args else kwargs["hidden_states"]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            fn(module, *expert_x1(self, hidden, top_k_index))

        return self.module.register_forward_pre_hook(experts_hook, with_kwargs=True)

    def bias(self, role: str) -> torch.Tensor | None:
        """The bias of "up", "gate" or "down" (the role's half for a fused gate/up layer), or None."""
        bias = getattr(self._layer(role), "bias", None)
        return None if bias is None else self._rows(role, bias)

    def features_last(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the FFN's input or x1) with its feature dimension last: a view."""
        return t if self.feature_dim == -1 else t.movedim(self.feature_dim, -1)

    def set_act(self, act: nn.Module) -> None:
        setattr(self.act_parent, self.act_attr, act)

    def _layer(self, role: str) -> nn.Module:
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
        layer = getattr(self, role)
        if layer is None:
            raise ValueError(f"FFN {self.name!r} is not gated: it has no gate")
        return layer

    def _rows(self, role: str, t: torch.Tensor) -> torch.Tensor:
        if not self.fused or role == "down":
            return t
        dim = 1 if t.dim() == 3 else 0  # (experts, out, in): the rows of each expert
        half = t.shape[dim] // 2
        first = (role == "gate") == (self.gate_half == "first")
        return t.narrow(dim, 0 if first else half, half)


class ExpertRows(NamedTuple):
    """Which token each row of fused experts' x1 belongs to: ``index`` into the ``tokens`` rows the experts
    module was called on (batch and sequence flattened, in that order)."""

    index: torch.Tensor
    tokens: int


def expert_x1(ffn: FFN, hidden: torch.Tensor, top_k_index: torch.Tensor) -> tuple[torch.Tensor, ExpertRows]:
    """x1 = act(gate) * up of fused experts for every (token, chosen expert) pair, as their eager forward computes
    it (one linear per expert with its [gate; up] rows, then the halves), grouped by expert; and the rows' tokens.

    ``hidden`` is (tokens, H), ``top_k_index`` (tokens, k): the experts module's inputs. An index equal to the
    number of experts (expert parallelism's "not on this rank") chooses nothing.
    """
    experts = ffn.num_experts
    chosen = top_k_index.reshape(-1)
    index = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(top_k_index.shape[-1])
    keep = chosen < experts
    chosen, index = chosen[keep], index[keep]
    order = chosen.argsort(stable=True)
    chosen, index = chosen[order], index[order]
    gate_up = getattr(ffn.module, ffn.expert_params[0])
    parts, start = [], 0
    for expert, count in enumerate(torch.bincount(chosen, minlength=experts).tolist()):
        if count:
            gate, up = F.linear(hidden[index[start:start + count]], gate_up[expert]).chunk(2, dim=-1)
            parts.append(ffn.act(gate) * up)
            start += count
    x1 = torch.cat(parts) if parts else hidden.new_zeros(0, ffn.hidden_features)
    return x1, ExpertRows(index, hidden.shape[0])


def _resolve(module: nn.Module, path: str, what: str, owner: str) -> object:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{owner}: no attribute {path!r} for the FFN's {what} (spec does not fit this module)")
        obj = getattr(obj, part)
    return obj


def _gate_half(module: nn.Module, spec: FFNSpec, owner: str) -> str | None:
    if spec.fused_gate is None or spec.fused_gate in _HALVES:
        return spec.fused_gate
    flag = _resolve(module, spec.fused_gate, "fused gate flag", owner)
    if not isinstance(flag, bool):
        raise ValueError(f"{owner}.{spec.fused_gate} (fused gate flag) is {flag!r}, expected a bool")
    return "last" if flag else "first"


def _record(name: str, module: nn.Module, spec: FFNSpec, found_by: str, in_decoder: bool) -> FFN:
    owner = name or type(module).__name__
    if spec.experts:
        return _experts_record(name, module, spec, found_by, in_decoder)
    layers = {}
    for role in _ROLES:
        path = getattr(spec, role)
        if path is None:
            continue
        layer = _resolve(module, path, role, owner)
        error = _projection_error(layer, f"{owner}.{path} ({role})")
        if error:
            raise ValueError(error)
        layers[role] = layer
    half = _gate_half(module, spec, owner)
    if half is not None:
        layers["gate"] = layers["up"]
    parent_path, _, attr = spec.act.rpartition(".")
    parent = _resolve(module, parent_path, "activation", owner) if parent_path else module
    if not isinstance(parent, nn.Module) or not callable(_resolve(parent, attr, "activation", owner)):
        raise ValueError(f"{owner}.{spec.act} (activation) is not a callable held by a module")
    ffn = FFN(name, module, layers["up"], layers["down"], layers.get("gate"), parent, attr, half, found_by,
              in_decoder)
    _check_widths(ffn, owner)
    return ffn


def _experts_record(name: str, module: nn.Module, spec: FFNSpec, found_by: str, in_decoder: bool) -> FFN:
    """The record of a fused experts module, after checking that it computes what `expert_x1` recomputes."""
    owner = name or type(module).__name__
    shapes = {}
    for role, path in (("gate_up", spec.up), ("down", spec.down)):
        param = _resolve(module, path, role, owner)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            raise ValueError(f"{owner}.{path} ({role}) is not a 3-D (experts, out, in) parameter (spec does not fit "
                             "this module)")
        shapes[role] = tuple(param.shape)
    (experts, gate_up, hidden), down = shapes["gate_up"], shapes["down"]
    if down != (experts, hidden, gate_up // 2) or gate_up % 2:
        raise ValueError(f"{owner}: gate_up {shapes['gate_up']} and down {down} are not (E, 2I, H) and (E, H, I) "
                         "(spec does not fit this module)")
    for flag in ("has_bias", "is_transposed"):
        if getattr(module, flag, False):
            raise ValueError(f"{owner}: fused experts with {flag}=True are not supported (unsupported layer type)")
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if implementation not in _ACT_FN_IMPLEMENTATIONS:
        raise ValueError(f"{owner}: experts implementation {implementation!r} does not call the module's act_fn, "
                         f"which the sparsity tools change and measure; use one of "
                         f"{[i for i in _ACT_FN_IMPLEMENTATIONS if i]} (model.set_experts_implementation)")
    if not callable(_resolve(module, spec.act, "activation", owner)):
        raise ValueError(f"{owner}.{spec.act} (activation) is not callable")
    return FFN(name, module, module, module, module, module, spec.act, "first", found_by, in_decoder,
               (spec.up, spec.down))


def activation_paths(model: nn.Module, ffns: Iterable[FFN]) -> list[tuple[str, FFN]]:
    """(module path of the FFN's activation attribute, the FFN) for each of ``ffns`` of ``model``."""
    names = {id(module): name for name, module in model.named_modules()}
    paths = []
    for ffn in ffns:
        parent = names[id(ffn.act_parent)]
        paths.append((f"{parent}.{ffn.act_attr}" if parent else ffn.act_attr, ffn))
    return paths


def refuse_fused_experts(ffns: Iterable[FFN], tool: str, reason: str) -> None:
    """ValueError naming the first fused experts module among ``ffns``: ``tool`` cannot work on them, ``reason``."""
    for ffn in ffns:
        if ffn.fused_experts:
            raise ValueError(f"{ffn.name or type(ffn.module).__name__} is a {type(ffn.module).__name__}: {tool} does "
                             f"not support fused mixture-of-experts weights ({reason})")


def _check_widths(ffn: FFN, owner: str) -> None:
    """The layers must chain: up (and gate) produce the hidden units down consumes (half of a fused layer each)."""
    widths = {role: ffn.weight(role).shape[0] for role in ("up", "gate") if role != "gate" or ffn.gated}
    if any(width != ffn.hidden_features for width in widths.values()):
        raise ValueError(f"{owner}: {widths} outputs do not match the {ffn.hidden_features} inputs of its down "
                         "projection (spec does not fit this module)")


# --- discovery ---------------------------------------------------------------------------------------------------


def _class_keys(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _refuse_fused_experts(model: nn.Module, specs: Iterable[FFNSpec]) -> None:
    """Mixture-of-experts layers whose experts are 3-D parameters, of a class the table does not describe, have no
    projection layer to measure or sparsify; skipping them would report a part of the model as all of it, so they
    are refused, naming the layer."""
    known = {cls for spec in specs for cls in spec.classes}
    for name, module in model.named_modules():
        fused = {key: tuple(p.shape) for key, p in module.named_parameters(recurse=False) if p.dim() == 3}
        if fused and type(module).__name__.endswith("Experts") and not known.intersection(_class_keys(module)):
            raise ValueError(
                f"{name or type(model).__name__} is a {type(module).__name__}: its experts are fused 3-D parameters "
                f"({', '.join(f'{k} {s}' for k, s in fused.items())}), not projection layers, and its class is not "
                "in the FFN table; the sparsity tools do not support these fused mixture-of-experts weights "
                "(unsupported layer type): describe them with FFNSpec(..., experts=True) if they compute "
                "down_proj[e] @ (act_fn(gate) * up) as MixtralExperts does")


def _in_decoder(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and "decoder" in name.split(".")


def _by_table(model: nn.Module, specs: Iterable[FFNSpec], found_by: str) -> list[FFN]:
    table = {cls: spec for spec in specs for cls in spec.classes}
    found = []
    for name, module in model.named_modules():
        spec = next((table[key] for key in _class_keys(module) if key in table), None)
        if spec is not None:
            found.append(_record(name, module, spec, found_by, _in_decoder(model, name)))
    return found


def find_ffns(model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> list[FFN]:
    """Every FFN of ``model`` in forward (module registration) order.

    By default the built-in table (`FFN_SPECS`) is used; if no module of ``model`` is in it, the model is searched
    by structure (an up projection, one activation and a down projection as children of one module, see
    `structural_spec`) and a warning says what was found and the `FFNSpec` that makes it explicit. ``specs``
    replaces both, e.g. ``find_ffns(model, [FFNSpec(("MyBlock",), up="w1", down="w2", act="act")])``.
    Fused mixture-of-experts modules of the table (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) give one record each;
    ValueError if no FFN is found, naming the model class, and for fused experts of any other class.
    """
    if specs is not None:
        found = _by_table(model, tuple(specs), "specs")
        known = sorted({cls for spec in specs for cls in spec.classes})
    else:
        _refuse_fused_experts(model, FFN_SPECS)
        found = _by_table(model, FFN_SPECS, "table") or _by_structure(model)
        known = sorted({cls for spec in FFN_SPECS for cls in spec.classes})
    if not found:
        raise ValueError(
            f"no FFN found in {type(model).__name__}: known FFN classes are {known}, and no module holds an up "
            "projection, one activation and a down projection. Describe yours with "
            "leanformer.sparsity.FFNSpec(classes=('YourMLP',), up='fc1', down='fc2', act='act', gate=None) and "
            "pass specs=[...]")
    return found


# --- structural fallback -----------------------------------------------------------------------------------------

# where activation modules are defined; a parameter-free leaf module of one of these is an activation
_ACTIVATION_HOMES = ("torch.nn.modules.activation", "transformers.activations", "timm.layers.activations",
                     "timm.layers.activations_me", "leanformer.sparsity.activations")
_NOT_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "TopK")



def check_ffn_selection(config: object) -> None:
    """Validate and normalise, in place on a frozen config, the two fields every FFN transform's config has:
    ``specs`` (a tuple of `FFNSpec`, or None for `FFN_SPECS`) and ``target_modules`` (see `leanformer._targets`)."""
    specs = config.specs
    if specs is not None:
        specs = tuple(specs)
        wrong = [type(s).__name__ for s in specs if not isinstance(s, FFNSpec)]
        if wrong:
            raise ValueError(f"specs: expected FFNSpec entries (see leanformer.sparsity.FFN_SPECS), got {wrong[:3]}")
    object.__setattr__(config, "specs", specs)
    object.__setattr__(config, "target_modules", check_targets("target_modules", config.target_modules))


def selected_ffns(model: nn.Module, specs: Iterable[FFNSpec] | None,
                  targets: str | tuple[str, ...] | None) -> list[FFN]:
    """The FFNs of ``model`` (`find_ffns`) whose module names the selection ``targets`` takes (see
    `leanformer._targets`); ValueError naming the selection and some FFN names when it takes none."""
    ffns = find_ffns(model, specs)
    chosen = [ffn for ffn in ffns if selects(targets, ffn.name)]
    if not chosen:
        raise ValueError(f"target_modules={targets!r} selects none of the FFNs of {type(model).__name__}; they are "
                         f"e.g. {[ffn.name for ffn in ffns[:3]]}")
    return chosen

def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential) and len(module) == 2 and type(module[1]).__name__ == "TopK":
        return _is_activation(module[0])  # apply_topk's wrapper
    cls = type(module)
    return cls.__module__ in _ACTIVATION_HOMES and cls.__name__ not in _NOT_ACTIVATIONS \
        and next(module.children(), None) is None and next(module.parameters(), None) is None


def structural_spec(module: nn.Module) -> FFNSpec | None:
    """The FFNSpec of ``module`` read from its children, or None if they do not form exactly one FFN.

    It must hold, as direct children, exactly one activation module and projection layers (those `layer_kind`
    reads) of which exactly one shape (h, d) has its transpose (d, h) among them too: one (h, d) and one (d, h)
    layer are up and down, in registration order when h == d; two (h, d) layers and one (d, h) are up, gate and
    down, the gate being the one named with "gate". The activation is a parameter-free module of torch,
    transformers, timm or leanformer (not softmax). Anything else (attention's four (d, d) layers, two ungated
    up projections, two activations) is no FFN: describe it with an FFNSpec.
    """
    children = list(module.named_children())
    acts = [name for name, child in children if _is_activation(child)]
    if len(acts) != 1:
        return None
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, child in children:
        if _projection_error(child, name) is None:
            by_shape.setdefault(tuple(layer_kind(child).weight(child).shape), []).append(name)  # (out, in)
    pairs = [(shape, names) for shape, names in by_shape.items()
             if shape[0] != shape[1] and (shape[1], shape[0]) in by_shape]
    squares = [names for shape, names in by_shape.items() if shape[0] == shape[1] and len(names) == 2]
    if len(pairs) == 2 and not squares:
        (_, first), (_, second) = pairs
        if len(first) == len(second) == 1:
            up, down = (first[0], second[0]) if _registered_before(children, first[0], second[0]) else \
                (second[0], first[0])
            return FFNSpec((type(module).__name__,), up=up, down=down, act=acts[0])
        ups, downs = (first, second) if len(first) == 2 else (second, first)
        gates = [name for name in ups if "gate" in name.lower()]
        if len(ups) == 2 and len(downs) == 1 and len(gates) == 1:
            up = next(name for name in ups if name != gates[0])
            return FFNSpec((type(module).__name__,), up=up, down=downs[0], act=acts[0], gate=gates[0])
    if not pairs and len(squares) == 1:
        up, down = squares[0]
        return FFNSpec((type(module).__name__,), up=up, down=down, act=acts[0])
    return None


def _registered_before(children: list[tuple[str, nn.Module]], a: str, b: str) -> bool:
    names = [name for name, _ in children]
    return names.index(a) < names.index(b)


def _by_structure(model: nn.Module) -> list[FFN]:
    found: list[FFN] = []
    specs: dict[FFNSpec, None] = {}  # the distinct layouts found, in order
    for name, module in model.named_modules():
        if any(name.startswith(f"{ffn.name}.") for ffn in found):
            continue  # inside an FFN already found
        spec = structural_spec(module)
        if spec is not None:
            found.append(_record(name, module, spec, "structure", _in_decoder(model, name)))
            specs[spec] = None
    if found:
        warnings.warn(f"find_ffns: no module of {type(model).__name__} is in leanformer's FFN table; found "
                      f"{len(found)} FFN(s) by structure: {', '.join(map(repr, specs))}. Pass specs=[...] with "
                      "these to make it explicit (and silence this warning)", stacklevel=3)
    return found

"""`SMoRALinear`: a frozen Linear plus a LoRA whose ranks are experts routed per token.

SMoRA (Zhao et al. 2025, "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task
Learning") shows that a mixture of LoRA experts is one LoRA whose rank blocks are gated, and makes every rank an
expert. Per token t a router scores the E experts (sigmoid); a per-expert balance bias, moved after each training
forward by DeepSeek-V3's loss-free rule (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"), is added for
the top-k choice; the chosen experts' gates are normalised to mean 1 and their ranks used:

    y = W0 x + (alpha / k) * B[:, idx] (g * A[idx] x)

Parameter names follow PEFT's LoRA layer (``base_layer``, ``lora_A``, ``lora_B``) and the official code
(``lora_router``, ``lora_biases``), so adapter files use the same keys.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .._gpu import use_triton
from .._projections import SUPPORTED_LAYERS, layer_kind
from .config import SMoRAConfig

__all__ = ["ForwardEnd", "ForwardStart", "RoutingContext", "SMoRALinear", "attach_root", "dense_adapter",
           "feature_sizes", "gather_adapter", "in_backward"]



def _global_load(load: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """The load of the whole global batch under torchrun (each process routes its slice): every process then
    moves its balance bias the same way, as one process training on the whole batch would."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load, tokens
    both = torch.cat([load, load.new_tensor([tokens])])
    dist.all_reduce(both)
    return both[:-1], int(both[-1])

class RoutingContext:
    """Shared by the SMoRA layers of one model (the "root" that carries the `ForwardStart`/`ForwardEnd` hooks).

    It knows, for the root's forward in progress: the real-token mask, flattened to (tokens,) booleans, if the root
    was called with an ``attention_mask`` (padding must not count as load); whether that forward trains (the root
    was in training mode with gradients on when it started: inside a reentrant checkpoint the layers themselves run
    without gradients); and a counter of root forwards, which tells a layer that a new step began. ``disabled``
    switches the adapters off.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.disabled = False
        self.depth = 0  # root forwards in progress (a root may be called inside itself)
        self.forward_id = 0
        self.trains = False
        self.handles: tuple = ()  # the root's hooks (`attach_root`)
        self.trainable: dict[str, bool] = {}  # requires_grad of every parameter before add_smora froze them


class ForwardStart:
    """Forward pre-hook of the root: a new root forward begins (a picklable object, so the model deep-copies and
    pickles with its adapters working)."""

    def __init__(self, context: RoutingContext) -> None:
        self.context = context

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self.context
        if context.depth == 0:
            mask = kwargs.get("attention_mask")
            # flattened once per forward, not once per adapted Linear
            context.token_mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            context.trains = module.training and torch.is_grad_enabled()
            context.forward_id += 1
        context.depth += 1


class ForwardEnd:
    """Forward hook of the root (always called, also when the forward raises): the root forward is over."""

    def __init__(self, context: RoutingContext) -> None:
        self.context = context

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        context = self.context
        context.depth -= 1
        if context.depth == 0:
            context.token_mask = None


def attach_root(root: nn.Module, context: RoutingContext) -> None:
    """Make ``root`` the module whose forwards are the steps of ``context``'s layers (``context.handles`` remove
    the hooks again; they are copied with the model and then remove the copy's)."""
    context.handles = (root.register_forward_pre_hook(ForwardStart(context), with_kwargs=True),
                       root.register_forward_hook(ForwardEnd(context), always_call=True))


def in_backward() -> bool:
    """True while autograd runs a backward pass, where gradient checkpointing recomputes forwards: a recomputed
    forward must route as the original did and record nothing. (The graph-task id is what
    `torch.utils.checkpoint` itself reads; it is -1 outside backward.)"""
    return torch._C._current_graph_task_id() != -1


def feature_sizes(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a layer SMoRA can wrap (see `leanformer._projections`: nn.Linear, transformers'
    Conv1D, 1x1 nn.Conv2d); TypeError naming the layer type for any other."""
    kind = layer_kind(layer)
    if kind is None or kind.unfit(layer) is not None:
        detail = (f" with kernel {layer.kernel_size}, stride {layer.stride}, groups {layer.groups}"
                  if isinstance(layer, nn.Conv2d) else "")
        raise TypeError(f"{type(layer).__name__}{detail} is not supported by SMoRA: it wraps {SUPPORTED_LAYERS} "
                        "(stride 1, one group)")
    out_features, in_features = kind.weight(layer).shape
    return in_features, out_features


class SMoRALinear(nn.Module):
    """``base_layer(x)`` plus the routed adapter; the base layer (nn.Linear, Conv1D or 1x1 Conv2d, see
    `feature_sizes`) is frozen, A/B/router trainable."""

    def __init__(self, base_layer: nn.Module, config: SMoRAConfig, context: RoutingContext | None = None,
                 compute: str = "gather"):
        super().__init__()
        in_features, out_features = feature_sizes(base_layer)
        self._channels_first = layer_kind(base_layer).feature_dim == 1  # a 1x1 Conv2d: features of NCHW maps
        self.base_layer = base_layer.requires_grad_(False)
        self.config = config
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Linear(in_features, config.r, bias=False, **factory)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, **factory)
        self.lora_router = nn.Linear(in_features, config.experts, bias=False, **factory)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # moved by the balancing rule, not by gradients; saved with the adapter
        self.register_buffer("lora_biases", torch.zeros(config.experts, **factory))
        # routing statistics since the last reset (see `routing_report`), not saved
        self.register_buffer("expert_load", torch.zeros(config.experts, dtype=torch.float64,
                                                        device=factory["device"]), persistent=False)
        self.routed_tokens = 0
        # the bias this step routes with (see `_routing_bias`); not state: taken anew at each step
        self._step_bias: torch.Tensor | None = None
        self._bias_step: int | None = None
        if context is None:  # a layer on its own is its own root
            context = RoutingContext()
            attach_root(self, context)
        self.context = context
        self.compute = compute
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """LoRA's start: A kaiming-uniform (a = sqrt 5, nn.Linear's default), B zero, so the adapter adds 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.kaiming_uniform_(self.lora_router.weight, a=math.sqrt(5))
        self.lora_biases.zero_()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads ``linear.weight`` (e.g. to find a dtype or device)."""
        return self.base_layer.weight

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, from the router's logits (tokens, experts): the ranks used (tokens, active_r) and their
        gates (tokens, active_r). Counts the load and, in a training forward, moves the balance bias; a forward
        recomputed by gradient checkpointing routes as the original did and records nothing."""
        cfg = self.config
        recomputed = in_backward()
        scores = torch.sigmoid(router_logits)
        biased = scores + self._routing_bias(recomputed)
        _, experts = biased.topk(cfg.active_experts, dim=-1, sorted=False)  # order is irrelevant; 10x faster
        chosen = (scores if cfg.gate_scores == "unbiased" else biased).gather(-1, experts)
        gates = chosen * (cfg.active_experts / chosen.sum(-1, keepdim=True).clamp_min(1e-9))  # mean 1
        if not recomputed:
            self._record(experts)
        if cfg.rank_partition == 1:
            return experts, gates
        offsets = torch.arange(cfg.rank_partition, device=experts.device)
        ranks = (experts.unsqueeze(-1) * cfg.rank_partition + offsets).flatten(-2)
        return ranks, gates.repeat_interleave(cfg.rank_partition, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.context.disabled:
            return out
        if self._channels_first:  # NCHW: the channels are the features of every pixel
            x = x.movedim(1, -1)
        tokens = self.lora_dropout(x.reshape(-1, self.in_features))
        # A x for every rank and the router's logits in one product: both read the same input
        both = F.linear(tokens, torch.cat((self.lora_A.weight, self.lora_router.weight)))
        h, router_logits = both.split((self.config.r, self.config.experts), dim=-1)
        ranks, gates = self.route(router_logits)
        adapter = gather_adapter if self.compute == "gather" else dense_adapter
        delta = adapter(h, self.lora_B.weight, ranks, gates * self.config.scaling)  # scaled while still (tokens, k)
        delta = delta.reshape(*x.shape[:-1], self.out_features)
        return out + (delta.movedim(-1, 1) if self._channels_first else delta).to(out.dtype)

    def merge(self) -> None:
        raise RuntimeError("a SMoRA adapter cannot be merged into the base weight: which ranks act depends on each "
                           "token (the router), so no single weight update equals it; serve it unmerged")

    def _routing_bias(self, recomputed: bool) -> torch.Tensor:
        """The balance bias as it was when this step began: routing is then a function of the inputs and of the
        state at the step's start, so a recomputed forward routes exactly like the original even though the bias
        moved after it. A step is one forward of the root; a call outside the root's forward is a step of its own."""
        context = self.context
        step = context.forward_id if context.depth > 0 else None
        if not recomputed and (self._step_bias is None or step is None or step != self._bias_step):
            self._step_bias, self._bias_step = self.lora_biases.clone(), step
        return self.lora_biases if self._step_bias is None else self._step_bias

    def _trains(self) -> bool:
        """Whether this call is part of a training forward: the root's mode and grad state when its forward
        started (inside a reentrant checkpoint the layer itself runs without gradients)."""
        context = self.context
        return self.training and (context.trains if context.depth > 0 else torch.is_grad_enabled())

    @torch.no_grad()
    def _record(self, experts: torch.Tensor) -> None:
        load, tokens = self._load(experts)
        if self._trains():
            load, tokens = _global_load(load, tokens)
            self._balance(load)
        self.expert_load += load
        self.routed_tokens += tokens

    def _real_tokens(self, count: int) -> torch.Tensor | None:
        mask = self.context.token_mask
        return mask if mask is not None and mask.numel() == count else None

    @torch.no_grad()
    def _load(self, experts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Tokens routed to each expert, counting real tokens only when the model's attention mask is known."""
        real = self._real_tokens(experts.shape[0])
        chosen = experts if real is None else experts[real]
        load = torch.bincount(chosen.reshape(-1), minlength=self.config.experts)
        return load.to(self.expert_load.dtype), chosen.shape[0]

    @torch.no_grad()
    def _balance(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's rule: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        if self.config.bias_update_rate > 0:
            step = self.config.bias_update_rate * torch.sign(load.mean() - load)
            self.lora_biases += step.to(self.lora_biases.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"r={c.r}, active_r={c.active_r}, experts={c.experts}, alpha={c.lora_alpha}, "
                f"gates={c.gate_scores}, compute={self.compute}")


def gather_adapter(h: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """B[:, ranks] (gates * h[ranks]) per token, h = A x for every rank: only the active ranks' columns of B,
    summed with `embedding_bag` (its per-sample weights carry gates * h). On CUDA tensors: one fused Triton kernel
    each way (``_triton.py``)."""
    if use_triton(h, b):
        from . import _triton

        return _triton.gather_adapter(h, b, ranks, gates)
    weights = h.gather(-1, ranks) * gates
    return F.embedding_bag(ranks, b.t().contiguous(), per_sample_weights=weights.to(b.dtype), mode="sum")


def dense_adapter(h: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The same product over all r ranks, the inactive ones gated to zero: the reference the gather path is tested
    against, and faster when r is small."""
    dense_gates = torch.zeros_like(h).scatter(-1, ranks, gates.to(h.dtype))
    return F.linear(h * dense_gates, b)

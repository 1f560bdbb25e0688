"""How fast sparse FFN inference is on this machine: dense vs exact vs predictor, same weights, same run.

Used by ``leanformer bench sparse-ffn`` and ``benchmarks/sparse_inference.py``. Layers are synthetic (random
weights of the requested shape) with a FATReLU threshold chosen so that a random token activates the requested
fraction of hidden units; every call gets a fresh input, hence a fresh active set. Weights are cycled over
enough layers (at least 4, and at least 256 MiB of them) that they do not stay in the CPU caches between calls,
as in a real model. All modes share the dense weights except the down projection, kept once more neuron-major:
4096x11008 gated needs about 3 GB. Timings are medians of interleaved runs after a warm-up (`leanformer._timing`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .._timing import time_interleaved
from .activations import FATReLU
from .ffn import FFNSpec
from .inference import SparseInferenceConfig, inference_report, sparsify_for_inference
from .predictor import LowRankPredictor, PredictorConfig

__all__ = ["SPEED_MODES", "SYNTHETIC_SPECS", "GatedFFN", "PlainFFN", "synthetic_layers", "time_sparse_ffn"]

SPEED_MODES = ("exact", "exact-torch", "predictor")
_CACHE_FLUSH_BYTES = 256 << 20


class GatedFFN(nn.Module):
    """LLaMA's FFN without biases: down(act(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, threshold: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.act_fn = FATReLU(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainFFN(nn.Module):
    """BERT/ViT's FFN: fc2(act(fc1(x)))."""

    def __init__(self, d_model: int, d_ff: int, threshold: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, d_ff), FATReLU(threshold), nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


SYNTHETIC_SPECS = (FFNSpec(("GatedFFN",), up="up_proj", down="down_proj", act="act_fn", gate="gate_proj"),
                   FFNSpec(("PlainFFN",), up="fc1", down="fc2", act="act"))


def _check_shape(d_model: int, d_ff: int, sparsity: float, batch: int) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: expected a fraction in [0, 1)")


@torch.no_grad()
def synthetic_layers(d_model: int, d_ff: int, *, sparsity: float, gated: bool = True, count: int | None = None,
                     seed: int = 0) -> list[nn.Module]:
    """``count`` random FFNs (default: enough to flush the caches) whose tokens leave ``sparsity`` of units zero.

    Inputs are standard normal; the FATReLU threshold of each layer is the ``sparsity`` quantile of its
    pre-activations over 256 random tokens.
    """
    _check_shape(d_model, d_ff, sparsity, 1)
    layer_bytes = (3 if gated else 2) * d_model * d_ff * 4
    count = count or max(4, math.ceil(_CACHE_FLUSH_BYTES / layer_bytes))
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count):
        layer = GatedFFN(d_model, d_ff) if gated else PlainFFN(d_model, d_ff)
        for param in layer.parameters():
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
        first = layer.gate_proj if gated else layer.fc1
        pre = first(torch.randn(256, d_model, generator=generator)).flatten()
        threshold = max(0.0, float(pre.kthvalue(max(1, int(sparsity * pre.numel()))).values))
        (layer.act_fn if gated else layer.act).threshold = threshold
        layers.append(layer.eval())
    return layers


def _down(layer: nn.Module) -> nn.Linear:
    return layer.down_proj if isinstance(layer, GatedFFN) else layer.fc2


def _twin(layer: nn.Module, down: nn.Linear) -> nn.Module:
    """A module of ``layer``'s class sharing its gate/up/activation modules, with ``down`` as its down projection:
    every mode times the same weights, and only the down weight exists twice (dense and neuron-major)."""
    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)  # a new table of the same submodules
    setattr(twin, "down_proj" if isinstance(layer, GatedFFN) else "fc2", down)
    return twin


def _predictors_for(layers: list[nn.Module], sparsity: float, rank: int | None, generator) -> dict:
    """Random low-rank predictors whose threshold predicts ``1 - sparsity`` of the units of a random token
    (speed only: their recall is meaningless)."""
    predictors = {}
    for index, layer in enumerate(layers):
        d_model, d_ff = layer.gate_proj.in_features, layer.gate_proj.out_features
        predictor = LowRankPredictor(d_model, d_ff, rank or PredictorConfig().rank_for(d_model))
        logits = predictor(torch.randn(256, d_model, generator=generator)).flatten()
        predictor.threshold.fill_(float(logits.kthvalue(max(1, int(sparsity * logits.numel()))).values))
        predictors[str(index)] = predictor
    return predictors


@torch.no_grad()
def time_sparse_ffn(d_model: int, d_ff: int, *, sparsity: float, batch: int = 1, gated: bool = True,
                    modes: tuple[str, ...] = SPEED_MODES, runs: int = 7, layers: int | None = None,
                    rank: int | None = None, seed: int = 0) -> dict:
    """Seconds per FFN call, dense and per sparse mode, and the speedups, for one shape and sparsity.

    ``sparsity`` is per token; with ``batch`` > 1 the tokens of a call share the union of their units. Modes:
    "exact" (compiled kernels when available), "exact-torch" (PyTorch ops only), "predictor" (gated only;
    random predictors predicting ``1 - sparsity`` of the units, to time the path, not its accuracy).
    Sparse modes never fall back to dense here (``max_active=1``), so the figure is the sparse path's.
    """
    _check_shape(d_model, d_ff, sparsity, batch)
    unknown = set(modes) - set(SPEED_MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}: expected some of {SPEED_MODES}")
    if "predictor" in modes and not gated:
        raise ValueError("mode 'predictor' needs gated FFNs")
    generator = torch.Generator().manual_seed(seed + 1)
    dense = synthetic_layers(d_model, d_ff, sparsity=sparsity, gated=gated, count=layers, seed=seed)
    models = {"dense": nn.Sequential(*dense)}
    downs = [copy.deepcopy(_down(layer)) for layer in dense]  # the one neuron-major copy every mode shares
    for mode in modes:
        model = nn.Sequential(*(_twin(layer, down) for layer, down in zip(dense, downs, strict=True)))
        predictors = _predictors_for(dense, sparsity, rank, generator) if mode == "predictor" else None
        # max_active 1 and no exact prefix: every call through the path timed
        config = SparseInferenceConfig("predictor" if mode == "predictor" else "exact", max_active=1.0,
                                       exact_prefix=0, specs=SYNTHETIC_SPECS)
        sparsify_for_inference(model, config, predictors)
        if mode == "exact-torch":  # the same modules asked for the PyTorch path (no process-wide switch)
            for module in model.modules():
                if hasattr(module, "native"):
                    module.native = False
        models[mode] = model
    inputs = torch.randn(16, batch, d_model, generator=generator)
    cursor = {"next": 0}

    def run(model: nn.Sequential):
        for layer in model:  # each layer on its own fresh input: a fresh active set per call
            layer(inputs[cursor["next"] % len(inputs)])
            cursor["next"] += 1

    timings = time_interleaved({mode: lambda model=model: run(model) for mode, model in models.items()}, runs,
                               warmup=2)
    count = len(dense)
    result = {"d_model": d_model, "d_ff": d_ff, "gated": gated, "sparsity": sparsity, "batch": batch,
              "layers": count, "runs": runs, "dense_s": timings["dense"]["median_s"] / count}
    for mode in modes:
        report = inference_report(models[mode])
        computed = [r["computed_fraction"] for r in report.values()]
        result[mode] = {"seconds": timings[mode]["median_s"] / count,
                        "speedup": timings["dense"]["median_s"] / timings[mode]["median_s"],
                        "computed_fraction": sum(computed) / len(computed),
                        "paths": sorted({p for r in report.values() for p in r["calls"]})}
    return result


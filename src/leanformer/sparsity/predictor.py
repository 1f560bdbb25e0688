"""Activation predictors: guess from an FFN's input which of its hidden units will be nonzero.

A ReLU-family FFN leaves most of its intermediate output x1 (the input of the down projection) at exactly
zero, but which units fire depends on the token. Deja Vu (Liu et al. 2023, "Deja Vu: Contextual Sparsity for
Efficient LLMs at Inference Time") and PowerInfer (Song et al. 2023, "PowerInfer: Fast Large Language Model
Serving with a Consumer-grade GPU") put a small predictor before every FFN: from the FFN input x it scores each
hidden unit, and only the units scored active get their rows of gate/up/down computed. A missed active unit
is an error in the output while a false alarm only costs time, so predictors are tuned for recall.

Here a predictor is a bias-free rank-r projection followed by a Linear to the hidden size (Deja Vu's shape),
trained per layer on recorded (x, x1 != 0) pairs, with one logit threshold per layer calibrated on held-out
tokens to reach a target recall:

    predictors, report = train_predictors(model, batches, PredictorConfig(target_recall=0.95))
    report.mean_recall, report.mean_predicted_sparsity
    predictors.save("out/")                      # out/predictors.safetensors
    mask = Predictors.load("out/")["model.layers.0.mlp"].predict(x)   # bool (..., hidden)

Memory: recording keeps, per FFN, ``max_tokens`` inputs (in the model's dtype) and boolean masks; lower
``max_tokens`` for models with many wide layers.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .._checks import is_int, is_real
from .._io import atomic_write
from .._loading import read_safetensors
from ..engine import LoopConfig, fit
from ._batches import split_batch
from ._tokens import align_mask, mask_of, padding_masks
from .ffn import FFN, FFNSpec, find_ffns, refuse_fused_experts

__all__ = ["LayerPrediction", "LowRankPredictor", "PredictorConfig", "PredictorReport", "Predictors",
           "evaluate_predictors", "record_ffn_activity", "train_predictors"]

FILE_NAME = "predictors.safetensors"
FORMAT = "leanformer.predictors"
VERSION = "1"


class LowRankPredictor(nn.Module):
    """Linear(in→rank, no bias) → Linear(rank→hidden): logits that a hidden unit is active.

    The rank bottleneck keeps the predictor far cheaper than the FFN it guards. ``threshold`` (a 0-dim
    buffer, saved with the weights) is the logit above which a unit is predicted active; calibration sets it.
    """

    def __init__(self, in_features: int, hidden_features: int, rank: int):
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden_features", hidden_features), ("rank", rank)):
            if not is_int(value) or value < 1:
                raise ValueError(f"LowRankPredictor {name}={value!r}: expected a positive integer")
        self.in_features, self.hidden_features, self.rank = in_features, hidden_features, rank
        self.fc1 = nn.Linear(in_features, rank, bias=False)
        self.fc2 = nn.Linear(rank, hidden_features)
        self.register_buffer("threshold", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., hidden_features); x is cast to the predictor's dtype, so a bf16 model can use fp32 ones."""
        return self.fc2(self.fc1(x.to(self.fc1.weight.dtype)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask (..., hidden_features) of the units predicted active: logits > threshold."""
        return self(x) > self.threshold

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, rank={self.rank}"


@dataclass(frozen=True)
class PredictorConfig:
    """How `train_predictors` records, trains and calibrates.

    rank: of every predictor. None: `rank_for` (in_features // 32, at least 16, at most in_features), which
        keeps a predictor at ~1.4% of a LLaMA FFN's multiply-adds and ~2% of a 4x-wide plain FFN's.
    target_recall: share of the truly active units (over held-out tokens) each layer's threshold must keep.
    steps, lr, batch_size: Adam steps per layer, its learning rate, tokens per step.
    max_tokens: recorded tokens kept per layer (a uniform random subsample if the batches hold more).
    val_fraction: share of the recorded tokens held out for calibration and the report.
    seed: of the subsample, the split, the initialisation and the training batches (global RNG untouched).
    """

    rank: int | None = None
    target_recall: float = 0.95
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 256
    max_tokens: int = 20000
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank is not None and (not is_int(self.rank) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r}: expected a positive integer or None (in_features // 32, >= 16)")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not is_int(self.max_tokens) or self.max_tokens < 2:
            raise ValueError(f"max_tokens={self.max_tokens!r}: expected an integer >= 2 (training + held-out tokens)")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        if not is_real(self.target_recall) or not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall!r}: expected a number in (0, 1]")
        if not is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr={self.lr!r}: expected a finite number > 0")
        if not is_real(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r}: expected a number in (0, 1)")

    def rank_for(self, in_features: int) -> int:
        """The predictor rank for an FFN with ``in_features`` inputs: ``rank`` or the default rule."""
        if self.rank is not None:
            return self.rank
        return min(in_features, max(16, in_features // 32))


@dataclass(frozen=True)
class LayerPrediction:
    """How one layer's predictor did on ``tokens`` tokens, all units pooled.

    recall: predicted-and-active / active (1.0 if nothing was active); precision: predicted-and-active /
    predicted (1.0 if nothing was predicted); the fractions are over tokens x hidden units.
    """

    name: str
    tokens: int
    recall: float
    precision: float
    true_active_fraction: float
    predicted_active_fraction: float
    threshold: float


@dataclass(frozen=True)
class PredictorReport:
    """Per-layer predictor quality, in forward order."""

    layers: tuple[LayerPrediction, ...]

    @property
    def mean_recall(self) -> float:
        return sum(layer.recall for layer in self.layers) / len(self.layers)

    @property
    def mean_predicted_sparsity(self) -> float:
        """Mean over layers of the share of units predicted inactive: the work sparse inference skips."""
        return sum(1.0 - layer.predicted_active_fraction for layer in self.layers) / len(self.layers)

    def to_dict(self) -> dict:
        """Plain numbers and strings (an all-or-nothing layer's threshold is +-inf: JSON writes it as Infinity)."""
        return {"mean_recall": self.mean_recall, "mean_predicted_sparsity": self.mean_predicted_sparsity,
                "layers": [asdict(layer) for layer in self.layers]}


class Predictors(nn.Module):
    """One LowRankPredictor per FFN name (dotted names are mapped to valid ModuleDict keys internally)."""

    def __init__(self, predictors: Mapping[str, LowRankPredictor]):
        super().__init__()
        if not predictors:
            raise ValueError("Predictors needs at least one (FFN name -> LowRankPredictor) entry")
        for name, predictor in predictors.items():
            if not isinstance(name, str) or not isinstance(predictor, LowRankPredictor):
                raise ValueError(f"Predictors expects str -> LowRankPredictor, got {name!r} -> "
                                 f"{type(predictor).__name__}")
        self._names = list(predictors)
        self._keys = {name: str(i) for i, name in enumerate(self._names)}  # ModuleDict keys may not hold dots
        self.layers = nn.ModuleDict({self._keys[name]: predictor for name, predictor in predictors.items()})

    def __getitem__(self, ffn_name: str) -> LowRankPredictor:
        if ffn_name not in self._keys:
            raise KeyError(f"no predictor for FFN {ffn_name!r}; predictors exist for {self._names}")
        return self.layers[self._keys[ffn_name]]

    def __contains__(self, ffn_name: str) -> bool:
        return ffn_name in self._keys

    def names(self) -> list[str]:
        """The FFN names, in the order given (forward order when trained)."""
        return list(self._names)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/predictors.safetensors`` atomically: weights and thresholds under ``<ffn name>.<key>``,
        the layer names and shapes as JSON in the file's metadata. Returns the file's path."""
        path = Path(directory) / FILE_NAME
        tensors, layers = {}, []
        for name in self._names:
            predictor = self[name]
            layers.append({"name": name, "in_features": predictor.in_features,
                           "hidden_features": predictor.hidden_features, "rank": predictor.rank})
            for key, tensor in predictor.state_dict().items():
                tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
        metadata = {"format": FORMAT, "version": VERSION, "layers": json.dumps(layers)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> Predictors:
        """Read what `save` wrote (a directory holding predictors.safetensors, or the file). Nothing is unpickled;
        a missing file, bad metadata, a missing or unexpected tensor or a wrong shape raise ValueError."""
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / FILE_NAME
        tensors, metadata = read_safetensors(path, "predictors file ")
        layers = _read_layers(path, metadata)
        predictors = {}
        for layer in layers:
            name, d, h, r = layer["name"], layer["in_features"], layer["hidden_features"], layer["rank"]
            shapes = {"fc1.weight": (r, d), "fc2.weight": (h, r), "fc2.bias": (h,), "threshold": ()}
            state = {}
            for key, shape in shapes.items():
                full = f"{name}.{key}"
                if full not in tensors:
                    raise ValueError(f"predictors file {path}: tensor {full!r} is missing")
                tensor = tensors.pop(full)
                if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                    raise ValueError(f"predictors file {path}: tensor {full!r} is {tensor.dtype} of shape "
                                     f"{tuple(tensor.shape)}, expected a float tensor of shape {shape}")
                state[key] = tensor
            predictor = LowRankPredictor(d, h, r)
            predictor.load_state_dict(state)
            predictors[name] = predictor
        if tensors:
            raise ValueError(f"predictors file {path}: unexpected tensors {sorted(tensors)} (not in its layer list)")
        return cls(predictors)

    def check_fits(self, model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> None:
        """ValueError unless every FFN of ``model`` has a predictor of its shape and every predictor an FFN."""
        ffns = find_ffns(model, specs)
        for ffn in ffns:
            if ffn.name not in self:
                raise ValueError(f"no predictor for FFN {ffn.name!r} of {type(model).__name__}; predictors exist "
                                 f"for {self._names}")
            predictor = self[ffn.name]
            expected = (ffn.in_features, ffn.hidden_features)
            if (predictor.in_features, predictor.hidden_features) != expected:
                raise ValueError(f"predictor for FFN {ffn.name!r} maps {predictor.in_features} -> "
                                 f"{predictor.hidden_features} features, but the FFN has {expected[0]} inputs and "
                                 f"{expected[1]} hidden units")
        extra = sorted(set(self._names) - {ffn.name for ffn in ffns})
        if extra:
            raise ValueError(f"predictors for FFNs {extra} that {type(model).__name__} does not have "
                             "(predictors of another model?)")


def _read_layers(path: Path, metadata: dict[str, str]) -> list[dict]:
    """The validated layer list of a predictors file's metadata."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"predictors file {path}: metadata 'format' is {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}")
    if metadata.get("version") != VERSION:
        raise ValueError(f"predictors file {path}: metadata 'version' is {metadata.get('version')!r}, "
                         f"expected {VERSION!r}")
    try:
        layers = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError as err:
        raise ValueError(f"predictors file {path}: metadata 'layers' is not valid JSON ({err})") from err
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"predictors file {path}: metadata 'layers' must be a non-empty JSON list, got {layers!r}")
    names = set()
    for layer in layers:
        fields = ("name", "in_features", "hidden_features", "rank")
        if not isinstance(layer, dict) or set(layer) != set(fields) or not isinstance(layer["name"], str) \
                or not all(is_int(layer[k]) and layer[k] >= 1 for k in fields[1:]):
            raise ValueError(f"predictors file {path}: metadata 'layers' entry {layer!r}: expected "
                             "{'name': str, 'in_features': int, 'hidden_features': int, 'rank': int} (positive)")
        if layer["name"] in names:
            raise ValueError(f"predictors file {path}: metadata 'layers' names {layer['name']!r} twice")
        names.add(layer["name"])
    return layers


# --- running the model ---------------------------------------------------------------------------------------------


def _run_ffns(model: nn.Module, batches: Iterable, ffns: list[FFN], mask_key: str | None, caller: str,
              on_tokens: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
    """Run ``model`` (eval, no_grad) over ``batches``; for every FFN call, ``on_tokens(index, x, active)`` gets its
    input tokens [n, in] and their ``x1 != 0`` [n, hidden] (padding tokens left out). Hooks always come off."""
    refuse_fused_experts(ffns, caller, "predictors choose units of an FFN's down projection, which sparse "
                         "inference does not support for fused experts")
    pending: list[torch.Tensor | None] = [None] * len(ffns)  # the FFN input, from up's call to down's
    current: dict = {False: None, True: None}  # the running batch's encoder/decoder masks

    def up_hook(index: int):
        def hook(_module, args):
            pending[index] = ffns[index].features_last(args[0])

        return hook

    def down_hook(index: int):
        def hook(_module, args):
            ffn = ffns[index]
            x, pending[index] = pending[index], None
            x1 = ffn.features_last(args[0])
            if x is None or x.shape[:-1] != x1.shape[:-1]:
                raise ValueError(f"FFN {ffn.name!r}: the input of its down projection (shape "
                                 f"{tuple(x1.shape)}) does not follow an up projection call over the same tokens")
            x1, mask = align_mask(x1, mask_of(ffn, current), f"FFN {ffn.name!r}")
            x, active = x.detach().reshape(-1, x.shape[-1]), (x1.detach() != 0).reshape(-1, x1.shape[-1])
            if mask is not None:
                keep = mask.reshape(-1)
                x, active = x[keep], active[keep]
            on_tokens(index, x, active)

        return hook

    modes = [(module, module.training) for module in model.modules()]
    handles = []
    n_batches = 0
    try:
        for index, ffn in enumerate(ffns):
            handles.append(ffn.up.register_forward_pre_hook(up_hook(index)))
            handles.append(ffn.down.register_forward_pre_hook(down_hook(index)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                call = split_batch(batch)
                current.update(padding_masks(call, mask_key))
                call.run(model)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if n_batches == 0:
        raise ValueError(f"{caller} needs at least one batch; `batches` was empty")


class _Reservoir:
    """A uniform random subsample of at most ``size`` tokens of a stream: the ``size`` smallest random keys.

    Incoming tokens are copied to CPU and buffered; the buffer is cut back to ``size`` whenever it reaches twice
    that, so memory stays bounded and each token is copied a bounded number of times. Every FFN gets its own
    generator seeded alike, so the same token positions are kept in every layer.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0

    def add(self, x: torch.Tensor, active: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.generator)
        # a copy: the model may reuse or modify its activation tensors in place after the hook
        self.parts.append((keys, x.to("cpu", copy=True), active.cpu()))
        self.count += x.shape[0]
        if self.count >= 2 * self.size:
            self._cut()

    def _cut(self) -> None:
        keys, x, active = (torch.cat(part) for part in zip(*self.parts, strict=True))
        if keys.numel() > self.size:
            kept = keys.topk(self.size, largest=False).indices.sort().values  # stream order kept
            keys, x, active = keys[kept], x[kept], active[kept]
        self.parts, self.count = [(keys, x, active)], keys.numel()

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs, active) of the kept tokens, or None if none were seen."""
        if self.count == 0:
            return None
        self._cut()
        return self.parts[0][1], self.parts[0][2]


def record_ffn_activity(model: nn.Module, batches: Iterable, *, specs: Iterable[FFNSpec] | None = None,
                        max_tokens: int = 20000, seed: int = 0,
                        mask_key: str | None = "attention_mask") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per FFN name, in forward order: (inputs [N, in], active [N, hidden]) on CPU, the training data of a predictor.

    ``inputs`` are the FFN inputs (of its up projection) in the model's dtype, ``active`` is ``x1 != 0`` for the
    same tokens (x1: the input of its down projection). Tokens are every position with leading dimensions
    flattened, padding left out as `measure_sparsity` does (``mask_key``); at most ``max_tokens`` per layer are
    kept, a uniform random subsample (seeded) in stream order. Batches follow `measure_sparsity`'s convention: a
    tensor, a dict of keyword arguments or an (inputs, targets) pair whose targets are ignored. The model runs in
    eval mode under no_grad; training flags are restored and the hooks removed even if it raises. ValueError if
    ``batches`` is empty or an FFN never ran.
    """
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}: expected a positive integer")
    ffns = find_ffns(model, specs)
    reservoirs = [_Reservoir(max_tokens, seed) for _ in ffns]
    _run_ffns(model, batches, ffns, mask_key, "record_ffn_activity",
              lambda index, x, active: reservoirs[index].add(x, active))
    data = {}
    for ffn, reservoir in zip(ffns, reservoirs, strict=True):
        tokens = reservoir.tokens()
        if tokens is None:
            raise ValueError(f"FFN {ffn.name!r} saw no tokens (it never ran, or every token was masked out)")
        data[ffn.name] = tokens
    return data


# --- training, calibration, evaluation -----------------------------------------------------------------------------


def _chunks(x: torch.Tensor, active: torch.Tensor, size: int, device: torch.device) -> Iterator[tuple]:
    for start in range(0, x.shape[0], size):
        yield x[start:start + size].to(device), active[start:start + size].to(device)


def _counts(predictor: LowRankPredictor, x: torch.Tensor, active: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, active units, predicted units) of ``predictor`` on tokens ``x`` with truth ``active``."""
    predicted = predictor.predict(x)
    return int((predicted & active).sum()), int(active.sum()), int(predicted.sum())


def _layer_prediction(name: str, tokens: int, hidden: int, counts: tuple[int, int, int],
                      threshold: float) -> LayerPrediction:
    true_positive, positive, predicted = counts
    return LayerPrediction(name, tokens, recall=true_positive / positive if positive else 1.0,
                           precision=true_positive / predicted if predicted else 1.0,
                           true_active_fraction=positive / (tokens * hidden),
                           predicted_active_fraction=predicted / (tokens * hidden), threshold=threshold)


def _new_predictor(in_features: int, hidden: int, rank: int, active_rate: torch.Tensor,
                   generator: torch.Generator) -> LowRankPredictor:
    """A predictor initialised from ``generator`` (as nn.Linear does) with fc2's bias at each unit's log-odds
    of firing: it starts from the base rates and training only has to learn how x moves them."""
    with torch.device("meta"):
        predictor = LowRankPredictor(in_features, hidden, rank)
    predictor = predictor.to_empty(device="cpu")
    with torch.no_grad():
        for linear in (predictor.fc1, predictor.fc2):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        predictor.fc2.bias.copy_(torch.logit(active_rate.float(), eps=1e-4))
        predictor.threshold.zero_()
    return predictor


def _calibrate(predictor: LowRankPredictor, x: torch.Tensor, active: torch.Tensor, target_recall: float,
               chunk: int, device: torch.device) -> float:
    """The largest logit threshold that keeps at least ``target_recall`` of the active units of these tokens.

    With P active units, at most floor((1 - target) * P) may be missed: the threshold lies just below the
    (missed + 1)-th smallest logit of an active unit, so that unit and every larger one are predicted.
    """
    with torch.no_grad():
        logits = torch.cat([predictor(xs)[a].float() for xs, a in _chunks(x, active, chunk, device)])
    missed = math.floor((1.0 - target_recall) * logits.numel())
    kth = logits.kthvalue(missed + 1).values
    return float(torch.nextafter(kth, torch.tensor(-math.inf, device=kth.device)))


def _fit_layer(name: str, x: torch.Tensor, active: torch.Tensor, config: PredictorConfig, device: torch.device,
               generator: torch.Generator) -> tuple[LowRankPredictor, LayerPrediction]:
    """Train, calibrate and report one layer's predictor on its recorded tokens (see `train_predictors`)."""
    n, hidden = active.shape
    if n < 2:
        raise ValueError(f"FFN {name!r}: {n} recorded token; training and held-out tokens need at least 2")
    order = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, round(n * config.val_fraction)))
    val_x, val_active = x[order[:n_val]], active[order[:n_val]]
    train_x, train_active = x[order[n_val:]], active[order[n_val:]]
    rate = train_active.float().mean(0)
    predictor = _new_predictor(x.shape[1], hidden, config.rank_for(x.shape[1]), rate, generator).to(device)

    if not active.any() or active.all():  # nothing to learn: predict every unit off, or every unit on
        threshold = math.inf if not active.any() else -math.inf
    else:
        positive = int(train_active.sum())
        pos_weight = torch.tensor(max(1.0, (train_active.numel() - positive) / max(positive, 1)), device=device)

        def batches():  # endless random batches of the layer's recorded tokens
            while True:
                index = torch.randint(train_x.shape[0], (min(config.batch_size, train_x.shape[0]),),
                                      generator=generator)
                yield train_x[index].to(device), train_active[index].to(device)

        def loss(predictor: nn.Module, batch) -> torch.Tensor:
            logits = predictor(batch[0])
            return F.binary_cross_entropy_with_logits(logits, batch[1].to(logits.dtype), pos_weight=pos_weight)

        # Adam at a constant learning rate: the cosine schedule's floor set to its peak
        fit(predictor, batches(), loss, LoopConfig(steps=config.steps, lr=config.lr, min_lr=config.lr),
            optimizer=torch.optim.Adam(predictor.parameters(), lr=config.lr), distributed=False, progress=False)
        calibration = (val_x, val_active) if val_active.any() else (train_x, train_active)
        threshold = _calibrate(predictor, *calibration, config.target_recall, config.batch_size, device)
    predictor.threshold.fill_(threshold)
    with torch.no_grad():
        counts = [_counts(predictor, xs, a) for xs, a in _chunks(val_x, val_active, config.batch_size, device)]
    report = _layer_prediction(name, n_val, hidden, tuple(map(sum, zip(*counts, strict=True))), threshold)
    return predictor.eval(), report


def train_predictors(model: nn.Module, batches: Iterable, config: PredictorConfig = PredictorConfig(), *,
                     specs: Iterable[FFNSpec] | None = None, progress: bool = True,
                     mask_key: str | None = "attention_mask") -> tuple[Predictors, PredictorReport]:
    """Record the FFN activity of ``model`` on ``batches`` (as `measure_sparsity` takes them), then train and
    calibrate one predictor per FFN.

    Per layer, the recorded tokens (`record_ffn_activity`, at most ``config.max_tokens``) are split into training
    and held-out tokens (``val_fraction``). The predictor is trained with Adam on BCE-with-logits against
    ``x1 != 0``, with ``pos_weight`` = inactive / active (at least 1) over the training tokens: active and
    inactive units weigh the same in total however sparse the layer, so the rare active class is not ignored
    (recall is what matters), and a dense layer is not pushed towards "off". Its threshold is then the largest
    logit threshold reaching ``target_recall`` on the held-out tokens, and the report is measured on those same
    tokens, so its recall is >= target by construction (call `evaluate_predictors` on other batches for an
    unbiased figure); precision and predicted sparsity are what the threshold costs.

    A layer with no active unit in the recorded tokens gets threshold +inf (predicts nothing), one with no
    inactive unit -inf (predicts everything, i.e. stays dense); neither is trained. Predictors are fp32, on the
    device of their FFN's weights. Shows a progress bar over layers unless ``progress=False``.
    """
    if not isinstance(config, PredictorConfig):
        raise ValueError(f"config must be a PredictorConfig, got {type(config).__name__}")
    data = record_ffn_activity(model, batches, specs=specs, max_tokens=config.max_tokens, seed=config.seed,
                               mask_key=mask_key)
    devices = {ffn.name: ffn.up.weight.device for ffn in find_ffns(model, specs)}
    generator = torch.Generator().manual_seed(config.seed)
    predictors, layers = {}, []
    for name, (x, active) in tqdm(data.items(), desc="predictors", unit="layer", leave=False,
                                  disable=not progress, file=sys.stderr):
        predictors[name], layer = _fit_layer(name, x, active, config, devices[name], generator)
        layers.append(layer)
    return Predictors(predictors), PredictorReport(tuple(layers))


def evaluate_predictors(model: nn.Module, predictors: Predictors, batches: Iterable, *,
                        specs: Iterable[FFNSpec] | None = None,
                        mask_key: str | None = "attention_mask") -> PredictorReport:
    """Recall, precision and predicted sparsity of ``predictors`` on every (unpadded) token of ``batches`` (as
    `measure_sparsity` takes them).

    Counts are accumulated while the model runs, so nothing is stored; the predictors must fit the model
    (`Predictors.check_fits`) and are run on their own device.
    """
    predictors.check_fits(model, specs)
    ffns = find_ffns(model, specs)
    layers = [predictors[ffn.name] for ffn in ffns]
    totals = [[0, 0, 0, 0] for _ in ffns]  # tokens, true positives, active, predicted

    def count(index: int, x: torch.Tensor, active: torch.Tensor) -> None:
        device = layers[index].threshold.device
        counts = (x.shape[0], *_counts(layers[index], x.to(device), active.to(device)))
        totals[index] = [total + new for total, new in zip(totals[index], counts, strict=True)]

    _run_ffns(model, batches, ffns, mask_key, "evaluate_predictors", count)
    reports = []
    for ffn, predictor, (tokens, *counts) in zip(ffns, layers, totals, strict=True):
        if tokens == 0:
            raise ValueError(f"FFN {ffn.name!r} saw no tokens (it never ran, or every token was masked out)")
        reports.append(_layer_prediction(ffn.name, tokens, ffn.hidden_features, tuple(counts),
                                         float(predictor.threshold)))
    return PredictorReport(tuple(reports))

"""Save and reload a model whose FFN activations leanformer changed, so that the same model comes back.

`relufy` and `apply_topk` change what a model computes, and nothing in a Hugging Face checkpoint or a state dict
says so: reloaded, the model would silently be the original again (SiLU/GELU). Every FFN activation leanformer
set is therefore *recorded* — per activation module path: ReLU, FATReLU and its threshold, or the model's own
activation, each optionally followed by Top-k — and:

- for a Hugging Face model the record lives in ``model.config.leanformer`` and the config's activation fields
  (``hidden_act``, ``activation_function``, ...) are set so that a plain ``from_pretrained`` of a saved copy
  gives the same model when transformers can express it (every FFN ReLU, nothing else changed) and fails loudly
  when it cannot (FATReLU, Top-k, or ReLU that the same field would also put elsewhere, such as BERT's MLM head):
  the field then names a function transformers does not have. `relufy` and `apply_topk` keep this up to date,
  so even the model's own ``save_pretrained`` writes a config that reloads right or not at all;
- any other module (ours, timm) is saved as ``model.safetensors`` with the record in its metadata, which
  `leanformer.create_model(..., checkpoint_path=...)` refuses to load as a plain checkpoint.

`load_pretrained` reads either and puts every recorded activation back.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .._checks import check_int, check_real
from .._hf import check_causal_lm_folder, hf_progress_bars, load_causal_lm
from .._io import atomic_write, write_files_atomic
from .._loading import first_line, hf_from_pretrained, read_safetensors
from ..data import load_tokenizer
from ..models._checkpoint import TRANSFORMS_METADATA_KEY, check_state_dict
from .activations import FATReLU, ReLUConfig, is_topk_wrapped, relufy, topk_wrapped
from .ffn import FFNSpec, activation_paths, find_ffns
from .thresholds import input_threshold_record, is_thresholded, set_input_threshold, thresholded

__all__ = ["SPARSITY_FILE", "CausalLM", "activation_record", "load_pretrained", "load_sparsified_lm",
           "recorded_threshold", "save_pretrained", "sync_hf_config"]

RECORD_FORMAT = "leanformer.ffn-activations"
RECORD_VERSION = 1
# version 2 adds what a version-1 reader would silently drop: TEAL input thresholds ("inputs") and CATS
# thresholds after the model's own activation ("magnitude_threshold"); files without them stay version 1
RECORD_VERSIONS = (1, 2)
WEIGHTS_NAME = "model.safetensors"
CONFIG_KEY = "leanformer"  # the attribute of a Hugging Face config (and key of its config.json) with the record
# config fields transformers builds FFN activations from; the value a ReLU FFN needs in each
_ACTIVATION_FIELDS = {
    "hidden_act": lambda config: "relu",
    "activation_function": lambda config: "relu",
    "hidden_activation": lambda config: "relu",
    "activation": lambda config: "relu",  # DistilBERT, Falcon
    "dense_act_fn": lambda config: "relu",  # T5, next to feed_forward_proj
    "feed_forward_proj": lambda config: "gated-relu" if getattr(config, "is_gated_act", False) else "relu",
}


def activation_record(model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> dict[str, dict]:
    """Per FFN activation module path: what leanformer set there, e.g. ``{"act": "fatrelu", "threshold": 0.01}``,
    ``{"act": "model", "topk": 32}`` (the model's own activation followed by Top-k); empty if nothing changed."""
    record = {}
    for path, ffn in activation_paths(model, find_ffns(model, specs)):
        entry = _describe(ffn.act)
        if entry != {"act": "model"}:
            record[path] = entry
    return record


def sync_hf_config(model: nn.Module, specs: Iterable[FFNSpec] | None = None) -> None:
    """Make a Hugging Face model's config tell the truth about its FFN activations (see the module docstring).

    Called by `relufy` and `apply_topk`; a no-op for models without a transformers config.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return
    record = activation_record(model, specs)
    inputs = input_threshold_record(model)
    previous = getattr(config, CONFIG_KEY, None)
    original = previous["original"] if isinstance(previous, dict) and "original" in previous else \
        {field: getattr(config, field) for field in _ACTIVATION_FIELDS if hasattr(config, field)}
    if not record and not inputs:
        for field, value in original.items():
            setattr(config, field, value)
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        return
    if not original:
        warnings.warn(f"{type(config).__name__} has none of the activation fields {sorted(_ACTIVATION_FIELDS)}: a "
                      "plain from_pretrained of a saved copy cannot be made to refuse; reload it with "
                      "leanformer.load_pretrained", stacklevel=3)
    relu_fields = {field: _ACTIVATION_FIELDS[field](config) for field in original}
    reloads_plainly = not inputs and all(entry == {"act": "relu"} for entry in record.values()) and \
        _plain_build_matches(model, relu_fields, record)
    kinds = sorted({_kind(entry) for entry in record.values()} | ({"teal"} if inputs else set()))
    marker = f"{'+'.join(kinds)} FFNs set by leanformer: load with leanformer.load_pretrained"
    for field in original:
        setattr(config, field, relu_fields[field] if reloads_plainly else marker)
    setattr(config, CONFIG_KEY, {**_record(record, inputs), "original": original, "plain_reload": reloads_plainly})


def _kind(entry: dict) -> str:
    return "topk" if "topk" in entry else "cats" if "magnitude_threshold" in entry else entry["act"]


def _record(activations: dict, inputs: dict) -> dict:
    """The record of a model's activations and input thresholds, version 2 only when it needs it."""
    newer = bool(inputs) or any("magnitude_threshold" in entry for entry in activations.values())
    record = {"format": RECORD_FORMAT, "version": 2 if newer else RECORD_VERSION, "activations": activations}
    return {**record, "inputs": inputs} if inputs else record


def save_pretrained(model: nn.Module, directory: str | Path, specs: Iterable[FFNSpec] | None = None) -> Path:
    """Save ``model`` with its FFN activations recorded, atomically; returns ``directory``.

    A Hugging Face model is written by its own ``save_pretrained`` (config.json carries the record); any other
    module as ``directory/model.safetensors`` with the record in the file's metadata. Reload with `load_pretrained`.
    """
    directory = Path(directory)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        sync_hf_config(model, specs)
        write_files_atomic(directory, model.save_pretrained)
        return directory
    record = _record(activation_record(model, specs), input_threshold_record(model))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # no shared storage
    metadata = {TRANSFORMS_METADATA_KEY: json.dumps(record), "format": "pt"}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
    return directory


def load_pretrained(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model `save_pretrained` wrote to ``directory``, with every recorded FFN activation put back.

    A Hugging Face folder is loaded with its architecture's class (nothing downloaded; ``model`` must be None).
    Any other model: pass ``model`` built as the saved one was (e.g. ``create_model(name, num_classes=...)``);
    its weights and activations are replaced. Bad or mismatching files raise ValueError naming the file.
    """
    directory = Path(directory)
    if (directory / "config.json").is_file():
        if model is not None:
            raise ValueError(f"{directory} is a Hugging Face model folder: call load_pretrained without a model")
        return _load_hf(directory)
    if model is None:
        raise ValueError(f"{directory} has no config.json (not a Hugging Face folder): pass the model to load into, "
                         "built as the saved one was, e.g. load_pretrained(dir, create_model(name, ...))")
    return _load_module(directory / WEIGHTS_NAME, model)


def _describe(act: nn.Module) -> dict:
    entry: dict = {}
    if is_topk_wrapped(act):
        topk, act, entry["topk"] = act[1], act[0], act[1].k
        if topk.dim != -1:  # an NCHW FFN (1x1 Conv2d): its features are dimension 1
            entry["topk_dim"] = topk.dim
    if is_thresholded(act):
        act, entry["magnitude_threshold"] = act[0], act[1].threshold
    if isinstance(act, FATReLU) and act.threshold > 0:  # FATReLU(0) is ReLU in value: saved as ReLU
        return {"act": "fatrelu", "threshold": act.threshold, **entry}
    if isinstance(act, FATReLU):
        return {"act": "relu", **entry}
    return {"act": "relu" if type(act) is nn.ReLU else "model", **entry}


def _rebuild(current: nn.Module, entry: dict) -> nn.Module:
    own = current[0] if is_topk_wrapped(current) else current
    own = own[0] if is_thresholded(own) else own
    act = {"relu": nn.ReLU, "fatrelu": lambda: FATReLU(entry["threshold"]), "model": lambda: own}[entry["act"]]()
    if "magnitude_threshold" in entry:
        act = thresholded(act, entry["magnitude_threshold"])
    return topk_wrapped(act, entry["topk"], entry.get("topk_dim", -1)) if "topk" in entry else act


def _plain_build_matches(model: nn.Module, fields: dict[str, str], relu_paths: Iterable[str]) -> bool:
    """Whether transformers, given ``fields`` in the config, builds ReLU at ``relu_paths`` and every other
    parameter-free leaf module (the other activations) as ``model`` has it: then a plain ``from_pretrained``
    reloads the same model. Built on the meta device, so it costs no memory."""
    config = copy.deepcopy(model.config)
    for field, value in fields.items():
        setattr(config, field, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model)(config)
    except Exception:  # noqa: BLE001 (any failure to build means transformers cannot express it)
        return False
    ours, relu_paths = dict(model.named_modules()), set(relu_paths)
    for name, module in fresh.named_modules():
        if next(module.children(), None) is not None or next(module.parameters(), None) is not None \
                or next(module.buffers(), None) is not None:
            continue
        mine = ours.get(name)
        same = type(module) is nn.ReLU if name in relu_paths else \
            mine is not None and type(mine) is type(module) and mine.extra_repr() == module.extra_repr()
        if not same:
            return False
    return True


def _check_record(record: object, source: str) -> tuple[dict[str, dict], dict[str, float]]:
    """The activations and input thresholds of a record read from ``source``, validated field by field."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{source}: not a leanformer activation record (expected format {RECORD_FORMAT!r})")
    if record.get("version") not in RECORD_VERSIONS:
        raise ValueError(f"{source}: record version {record.get('version')!r} is not supported "
                         f"(expected one of {', '.join(map(str, RECORD_VERSIONS))})")
    activations = record.get("activations")
    if not isinstance(activations, dict):
        raise ValueError(f"{source}: 'activations' must be an object of module path -> activation")
    for path, entry in activations.items():
        where = f"{source}: activations[{path!r}]"
        if not isinstance(entry, dict) or entry.get("act") not in ("relu", "fatrelu", "model"):
            raise ValueError(f"{where}: expected an object with act 'relu', 'fatrelu' or 'model'")
        if entry["act"] == "fatrelu":
            check_real(f"{where}.threshold", entry.get("threshold"), 0)
        if "topk" in entry:
            check_int(f"{where}.topk", entry["topk"], 1)
        dim = entry.get("topk_dim", -1)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise ValueError(f"{where}.topk_dim={dim!r}: expected an integer")
        if "magnitude_threshold" in entry:
            check_real(f"{where}.magnitude_threshold", entry["magnitude_threshold"], 0)
    inputs = record.get("inputs", {})
    if not isinstance(inputs, dict):
        raise ValueError(f"{source}: 'inputs' must be an object of Linear path -> input threshold")
    for path, threshold in inputs.items():
        check_real(f"{source}: inputs[{path!r}]", threshold, 0)
    return activations, inputs


def _apply_inputs(model: nn.Module, inputs: dict[str, float], source: str) -> None:
    for path, threshold in inputs.items():
        try:
            set_input_threshold(model, path, threshold)
        except (AttributeError, ValueError) as err:
            raise ValueError(f"{source}: cannot set the recorded input threshold on {path!r} ({err})") from err


def _apply(model: nn.Module, activations: dict[str, dict], source: str) -> None:
    for path, entry in activations.items():
        parent_name, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            current = getattr(parent, attr)
        except AttributeError as err:
            raise ValueError(f"{source}: the model has no module {path!r} to set the recorded activation on") \
                from err
        setattr(parent, attr, _rebuild(current, entry))


def _load_hf(directory: Path) -> nn.Module:
    import transformers  # imported here: slow to import, and only needed for Hugging Face folders

    config_path = directory / "config.json"
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"{config_path}: expected a Hugging Face config with a 'model_type'")
    record = values.get(CONFIG_KEY)
    activations, inputs = _check_record(record, f"{config_path}: {CONFIG_KEY}") if record is not None else ({}, {})
    if record is not None:
        original = record.get("original")
        if not isinstance(original, dict):
            raise ValueError(f"{config_path}: {CONFIG_KEY}.original must be an object of the activation fields")
        values.update(original)
    architectures = values.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(f"{config_path}: architectures {architectures!r} names no transformers model class")
    try:
        config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a config transformers can build ({first_line(err)})") from err
    model = hf_from_pretrained(cls, directory, config=config)
    _apply(model, activations, str(config_path))
    _apply_inputs(model, inputs, str(config_path))
    sync_hf_config(model)  # the config again says what a plain reload of a copy would need
    return model


def _load_module(path: Path, model: nn.Module) -> nn.Module:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not a folder written by leanformer.save_pretrained")
    state, metadata = read_safetensors(path)
    try:
        record = json.loads(metadata.get(TRANSFORMS_METADATA_KEY, ""))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {TRANSFORMS_METADATA_KEY!r} is missing or not JSON") from err
    activations, inputs = _check_record(record, f"{path}: metadata {TRANSFORMS_METADATA_KEY}")
    _apply(model, activations, str(path))
    _apply_inputs(model, inputs, str(path))
    check_state_dict(model, state, repr(str(path)))
    model.load_state_dict(state)
    return model


# -- a causal LM folder as `leanformer sparsify` left it ----------------------------------------------------------

SPARSITY_FILE = "sparsity.json"  # what `leanformer sparsify` writes next to the model


@dataclass(frozen=True)
class CausalLM:
    """The loaded model (eval mode), its tokenizer (None: bytes as tokens) and what its FFNs compute."""

    model: nn.Module
    tokenizer: Any | None
    activation: str


def _check_threshold(value: object, where: str) -> float:
    return float(check_real(where, value, 0))


def recorded_threshold(folder: Path) -> float | None:
    """The FATReLU threshold in ``folder/sparsity.json`` (``config.threshold``), or None without file or field."""
    path = folder / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    config = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(config, dict) or "threshold" not in config:
        return None
    return _check_threshold(config["threshold"], f"{path}: config.threshold")


def load_sparsified_lm(folder: Path, threshold: float | None = None, progress: bool = False,
                       relu_needed_by: str | None = None, threshold_name: str = "threshold") -> CausalLM:
    """Load ``folder`` (nothing downloaded) with the FFN activations it was saved with, or FATReLU(threshold).

    A folder whose config.json records its activations (`leanformer.save_pretrained`, as sparsify writes it) is
    loaded exactly; an older sparsify folder (a ReLU config plus the threshold in sparsity.json) gets its recorded
    threshold. A threshold > 0 needs a ReLU/FATReLU model: on any other activation FATReLU would replace what the
    model was trained with, so that is refused, as is any non-ReLU model when ``relu_needed_by`` names a use that
    needs one. Everything is checked before the weights load. ``threshold_name``: how messages name
    ``threshold`` (a command line says its flag).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    check_causal_lm_folder(folder)
    config_path = folder / "config.json"
    values = json.loads(config_path.read_text())  # valid JSON: checked just above
    record = values.get(CONFIG_KEY)
    relu, described, problem = _ffn_activations(values, record, config_path)
    source = threshold_name
    if threshold is None and record is None:
        threshold, source = recorded_threshold(folder), SPARSITY_FILE
    elif threshold is not None:
        _check_threshold(threshold, threshold_name)
    if not relu and (threshold or relu_needed_by):
        needs = (f"FATReLU (threshold {threshold:g} from {source}) applies to ReLU models" if threshold else
                 f"{relu_needed_by} needs a ReLU or FATReLU model")
        raise ValueError(f"{config_path}: {problem}, but {needs}, as `leanformer sparsify` saves them")
    with hf_progress_bars(progress):
        model = (load_causal_lm(folder) if record is None else load_pretrained(folder)).eval()
    tokenizer = load_tokenizer(folder)
    if not threshold:
        return CausalLM(model, tokenizer, described)
    relufy(model, ReLUConfig("fatrelu", threshold))
    return CausalLM(model, tokenizer, f"FATReLU(threshold={threshold:g}) from {source}")


def _ffn_activations(values: dict, record: object, config_path: Path) -> tuple[bool, str, str]:
    """(whether every FFN is ReLU or FATReLU, what they are in words, and the same as a reason to refuse) from a
    folder's config.json."""
    if record is None:
        hidden_act = values.get("hidden_act")
        return hidden_act == "relu", f"config.hidden_act {hidden_act!r}", f"hidden_act is {hidden_act!r}"
    activations = record.get("activations") if isinstance(record, dict) else None
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(activations, dict) or not (activations or inputs):
        raise ValueError(f"{config_path}: {CONFIG_KEY}.activations must be a non-empty object")
    if not activations:
        described = f"TEAL input thresholds on {len(inputs)} Linears from config.json"
        return False, described, described
    entries = list(activations.values())
    relu = all(isinstance(e, dict) and e.get("act") in ("relu", "fatrelu") and "topk" not in e for e in entries)
    kinds = sorted({json.dumps(e, sort_keys=True) for e in entries})
    described = f"FFN activations {', '.join(kinds)} from config.json"
    return relu, described, described

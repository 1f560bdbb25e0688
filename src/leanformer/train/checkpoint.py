"""Training checkpoints you can trust: safetensors + JSON, atomic, checksummed.

A checkpoint folder holds `state-<step>.safetensors` (model weights, optimizer moments, RNG state)
and `meta.json` (epoch, step, config, optimizer hyperparameters, and the state file's size and
sha256). `meta.json` is written last and atomically: it is the commit point. A run killed at any
moment leaves either the previous checkpoint or the new one, and a damaged file is detected by its
checksum before anything is loaded. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, sha256_of, write_json_atomic

FORMAT = "leanformer.train-checkpoint"
VERSION = 1


def training_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           trainable_only: bool = False) -> tuple[dict, list]:
    """(tensors to store, JSON-able optimizer param groups) for a model + optimizer + RNG.

    trainable_only: leave out the frozen parameters (requires_grad False), e.g. the base model under an adapter,
    which the run rebuilds from its own files; buffers are kept (an adapter's may change while training).
    """
    frozen = frozen_parameter_names(model) if trainable_only else set()
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if k not in frozen}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, opt["param_groups"]


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict,
                           param_groups: list) -> None:
    """Inverse of `training_state_tensors`: load weights, optimizer moments and the RNG state.

    Only frozen parameters may be absent (saved with ``trainable_only``); anything else missing or unexpected
    raises ValueError before the optimizer or the RNG are touched.
    """
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    keys = set(model.state_dict())
    missing = keys - set(weights) - frozen_parameter_names(model)
    unexpected = set(weights) - keys
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(weights, strict=False)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch"])


def frozen_parameter_names(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the parameters that do not train (every key, so tied weights are all listed)."""
    return {k for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter) and not v.requires_grad}


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a checkpoint into `folder` atomically; older state files there are removed after."""
    folder = Path(folder)
    state_name = f"state-{meta['step']:09d}.safetensors"
    atomic_write(folder / state_name, lambda tmp: save_file(tensors, tmp))
    record = {**meta, "format": FORMAT, "version": VERSION, "state_file": state_name,
              "state_bytes": (folder / state_name).stat().st_size, "state_sha256": sha256_of(folder / state_name)}
    write_json_atomic(folder / "meta.json", record)
    for old in folder.glob("state-*.safetensors"):
        if old.name != state_name:
            old.unlink(missing_ok=True)
    return folder


def load_checkpoint_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint folder after checking its size and checksum."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a leanformer checkpoint: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {meta_path} is corrupt: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {meta_path}: expected format {FORMAT!r}, got {meta.get('format')!r}"
                         if isinstance(meta, dict) else f"checkpoint {meta_path}: expected a JSON object")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {meta_path}: version {meta.get('version')!r} is not supported (expected {VERSION})"
        )
    state_path = folder / str(meta.get("state_file"))
    if not state_path.is_file():
        raise ValueError(f"checkpoint {folder} is incomplete: {state_path.name} is missing")
    size = state_path.stat().st_size
    if size != meta.get("state_bytes"):
        raise ValueError(
            f"checkpoint {state_path} is corrupt or truncated: {size} bytes, expected {meta.get('state_bytes')}"
        )
    if sha256_of(state_path) != meta.get("state_sha256"):
        raise ValueError(f"checkpoint {state_path} is corrupt: sha256 does not match {meta_path}")
    return load_file(str(state_path)), meta


def check_same_run(saved: dict, current: dict, resumable: tuple[str, ...] = ()) -> None:
    """Refuse to resume a checkpoint under a different configuration (it would not be the same run).

    `saved` and `current` are config dicts as JSON gives them back; fields in `resumable` may differ.
    """
    changed = sorted(k for k in set(saved) | set(current) if k not in resumable and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume: the configuration differs from the checkpoint's ({details})")


def resolve_resume_folder(path: str | Path) -> Path:
    """Accept a run's output folder (resume from its `last/`) or a checkpoint folder itself."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--resume {path}: no such folder")
    return path / "last" if (path / "last" / "meta.json").is_file() else path

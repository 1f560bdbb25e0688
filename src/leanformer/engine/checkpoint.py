"""Training checkpoints you can trust: safetensors + JSON, atomic, checksummed, validated.

A checkpoint folder holds `state-<step>.safetensors` (model weights, optimizer moments, RNG state)
and `meta.json` (epoch, step, config, optimizer hyperparameters, and the state file's size and
sha256). `meta.json` is written last and atomically: it is the commit point. A run killed at any
moment leaves either the previous checkpoint or the new one, and a damaged file is detected by its
checksum before anything is loaded. Nothing is unpickled.

`meta.json` covers itself too (format version 2): ``meta_sha256`` is the sha256 of its canonical JSON (sorted keys,
no spaces, the digest field left out), so a field edited after the file was written (an epoch, a best accuracy) is
refused, naming the file. It guards against accidents and casual edits, not against a forger who recomputes it.
Every field is then checked by type and range, an error naming the file and the field. Version 1 files (written
before the digest) are still read: their fields are validated and their state file checksummed, as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._checks import is_int, is_real
from .._io import atomic_write, describe_os_error, dumps_json, sha256_of, write_json_atomic

FORMAT = "leanformer.train-checkpoint"
VERSION = 2  # 2: meta.json carries meta_sha256, a digest of its own content
READABLE_VERSIONS = (1, 2)
DIGEST_FIELD = "meta_sha256"
_STATE_FILE = re.compile(r"state-\d{9,}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def state_file_name(step: int) -> str:
    return f"state-{step:09d}.safetensors"


def meta_digest(meta: dict) -> str:
    """sha256 of ``meta``'s canonical JSON (sorted keys, no spaces), its own digest field left out."""
    body = {k: v for k, v in meta.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


class CheckpointWriteError(ValueError):
    """Writing a checkpoint failed (disk full, permission denied, ...): the message says what and which checkpoint
    the folder still holds (writes are atomic, so the previous one is intact)."""


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a checkpoint into `folder` atomically; older state files there are removed after. An OSError while
    writing becomes `CheckpointWriteError`, naming the checkpoint kept."""
    folder = Path(folder)
    try:
        return _write_checkpoint(folder, tensors, meta)
    except OSError as err:
        kept = (f"the last good checkpoint, {folder}, is kept" if (folder / "meta.json").is_file() else
                f"no checkpoint had been written to {folder} yet")
        raise CheckpointWriteError(f"{describe_os_error(err)}: {kept}") from err


def _write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    state_name = state_file_name(meta["step"])
    atomic_write(folder / state_name, lambda tmp: save_file(tensors, tmp))
    record = {**meta, "format": FORMAT, "version": VERSION, "state_file": state_name,
              "state_bytes": (folder / state_name).stat().st_size, "state_sha256": sha256_of(folder / state_name)}
    record = json.loads(dumps_json(record))  # as a reader gets it back, so that its digest is the one it computes
    write_json_atomic(folder / "meta.json", {**record, DIGEST_FIELD: meta_digest(record)})
    for old in folder.glob("state-*.safetensors"):
        if old.name != state_name:
            old.unlink(missing_ok=True)
    return folder


def load_checkpoint_folder(folder: str | Path, require: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint folder after checking meta.json's digest and fields and the state file's size
    and checksum. require: fields the caller needs besides the state file, step and param_groups."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    meta = _read_meta(folder, meta_path)
    _check_fields(meta, meta_path, (*REQUIRED_FIELDS, *require))
    state_path = folder / meta["state_file"]
    if not state_path.is_file():
        raise ValueError(f"checkpoint {folder} is incomplete: {state_path.name} is missing")
    size = state_path.stat().st_size
    if size != meta["state_bytes"]:
        raise ValueError(
            f"checkpoint {state_path} is corrupt or truncated: {size} bytes, expected {meta['state_bytes']}"
        )
    if sha256_of(state_path) != meta["state_sha256"]:
        raise ValueError(f"checkpoint {state_path} is corrupt: sha256 does not match {meta_path}")
    return load_file(str(state_path)), meta


def _read_meta(folder: Path, meta_path: Path) -> dict:
    """meta.json parsed, of our format and a version we read, its digest checked (version 2)."""
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a leanformer checkpoint: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {meta_path} is corrupt: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {meta_path}: expected format {FORMAT!r}, got {meta.get('format')!r}"
                         if isinstance(meta, dict) else f"checkpoint {meta_path}: expected a JSON object")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"checkpoint {meta_path}: version {meta.get('version')!r} is not supported (expected one "
                         f"of {', '.join(map(str, READABLE_VERSIONS))})")
    if meta["version"] >= 2 and meta.get(DIGEST_FIELD) != meta_digest(meta):
        raise ValueError(f"checkpoint {meta_path} does not match its digest ({DIGEST_FIELD}): it was edited or "
                         "damaged after it was written")
    return meta


def _nonnegative_int(value: object) -> bool:
    return is_int(value) and value >= 0


def _objects(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


# meta.json field -> (check, what it must be); a field missing from a file is refused only if required
META_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "state_file": (lambda v: isinstance(v, str) and bool(_STATE_FILE.fullmatch(v)), "a name state-<step>.safetensors"),
    "state_bytes": (_nonnegative_int, "an integer >= 0"),
    "state_sha256": (_sha256, "a sha256 hex digest"),
    "step": (_nonnegative_int, "an integer >= 0"),
    "epoch": (_nonnegative_int, "an integer >= 0"),
    "best_val_acc": (lambda v: is_real(v) and math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "history": (_objects, "a list of JSON objects"),
    "param_groups": (_objects, "a list of JSON objects"),
    "compute": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                "a JSON object of strings"),
}
REQUIRED_FIELDS = ("state_file", "state_bytes", "state_sha256", "step", "param_groups")


def _check_fields(meta: dict, meta_path: Path, required: Sequence[str]) -> None:
    """ValueError naming the file and the first field that is missing (if required) or not what it must be."""
    for name in required:
        if name not in meta:
            raise ValueError(f"checkpoint {meta_path}: field {name!r} is missing")
    for name, (check, expected) in META_FIELDS.items():
        if name in meta and not check(meta[name]):
            raise ValueError(f"checkpoint {meta_path}: field {name!r} is {reprlib.repr(meta[name])}, "
                             f"expected {expected}")
    if meta["state_file"] != state_file_name(meta["step"]):
        raise ValueError(f"checkpoint {meta_path}: field 'state_file' is {meta['state_file']!r}, expected "
                         f"{state_file_name(meta['step'])!r} (the state of step {meta['step']})")


class NonFiniteLossError(ValueError):
    """A training loss came out NaN or infinite and the run stopped there (the CLI reports it in one line)."""


def check_finite_loss(loss: float, step: int, checkpoint: Path | None) -> None:
    """NonFiniteLossError unless ``loss``, the loss of (1-based) training ``step``, is finite.

    Checked at every step: after one NaN every update is NaN, and a run that went on would train to nothing,
    checkpoint that, and end as if it had succeeded. The message says which checkpoint (if any) is kept.
    """
    if math.isfinite(loss):
        return
    kept = (f"the last good checkpoint, {checkpoint}, is kept" if checkpoint is not None
            and (checkpoint / "meta.json").is_file() else "no checkpoint had been written yet")
    raise NonFiniteLossError(f"the training loss is {loss} at step {step}: stopped there, {kept} (try a lower "
                             "learning rate, or check the data)")


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


def resume_run_folder(path: str | Path) -> Path:
    """The run folder a resumed training writes to: the one holding the `last/` or `best/` it resumes, or the
    checkpoint folder itself."""
    folder = resolve_resume_folder(path)
    return folder.parent if folder.name in ("last", "best") else folder

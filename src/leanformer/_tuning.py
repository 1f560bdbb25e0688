"""Fast-path choices made by measurement on the machine that runs them, cached per machine.

A kernel that wins on one CPU can lose on another (the oneDNN-vs-BLAS choice was 1.27x faster on a Zen 4 and 0.95x
on a Zen 3), so nothing here is decided by CPU name. A choice is measured the first time it is needed and kept in
``$LEANFORMER_CACHE/tuning/<machine>.json``, where the machine is named by what decides speed: CPU vendor, family,
model, stepping and SIMD flags, torch version and threads. A new CPU, torch or thread count measures again;
`leanformer tune` forgets the file and measures afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ._io import write_json_atomic
from ._loading import cache_root
from ._machine import machine_info

__all__ = ["cache_path", "forget", "machine_key", "tuned"]

# the machine_info fields that decide which kernel is fastest
_KEY_FIELDS = ("cpu_vendor", "cpu_family", "cpu_model", "cpu_stepping", "cpu_flags", "torch", "torch_threads",
               "cpu_capability")


def machine_key() -> str:
    """A file-name-safe name for this machine's speed: readable prefix plus a digest of every deciding field."""
    info = machine_info()
    fields = {name: info.get(name) for name in _KEY_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    vendor = str(info.get("cpu_vendor") or "cpu").replace("/", "_")
    return f"{vendor}-{info.get('cpu_family')}-{info.get('cpu_model')}-t{info.get('torch_threads')}-{digest}"


def cache_path() -> Path:
    return cache_root() / "tuning" / f"{machine_key()}.json"


def _read(path: Path) -> dict:
    """The cache file's choices, or {} when it is missing or not what this module writes (then measured again)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return payload.get("choices", {}) if isinstance(payload, dict) and isinstance(payload.get("choices"), dict) \
        else {}


def tuned(kind: str, key: str, measure: Callable[[], dict]) -> dict:
    """The cached measurement ``kind``/``key`` on this machine (a dict with at least "choice"), measuring it with
    ``measure()`` and storing it the first time."""
    path = cache_path()
    choices = _read(path)
    entry = choices.get(kind, {}).get(key)
    if isinstance(entry, dict) and "choice" in entry:
        return entry
    entry = measure()
    if "choice" not in entry:
        raise ValueError(f"tuning {kind}/{key}: the measurement returned no 'choice'")
    choices = _read(path)  # another process may have added choices meanwhile
    choices.setdefault(kind, {})[key] = entry
    with contextlib.suppress(OSError):  # an unwritable cache costs a measurement next time, never a failure
        write_json_atomic(path, {"machine": machine_info(), "choices": choices})
    return entry


def forget() -> Path:
    """Delete this machine's cached choices (`leanformer tune`); returns the path."""
    path = cache_path()
    path.unlink(missing_ok=True)
    return path

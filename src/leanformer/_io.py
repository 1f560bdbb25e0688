"""Atomic file writes: a temp file in the target folder, flushed, then renamed over the target.

A reader (or a resumed run after a crash) sees the old file or the new one, never half of one. Before the work
that produces them, `check_writable_dir` and `check_writable_file` make sure those places can be written at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)` and move the result to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and checkpoints are meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files_atomic(folder: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temp_folder)` (e.g. a library's ``save_pretrained``) and move each file it made into `folder`
    atomically: every file is seen old or new, never half-written (the set of files is not one transaction)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
        write(tmp)
        for path in Path(tmp).iterdir():
            os.chmod(path, 0o644)  # as atomic_write: meant to be shared (libraries may create them 0600)
            os.replace(path, folder / path.name)


def standard_json(payload):
    """A copy of ``payload`` that standard JSON can hold: non-finite floats (NaN, +-inf) become None, tuples lists.

    Python's json writes NaN and Infinity bare by default, which other JSON readers refuse; a missing value
    (a loss that diverged, a perplexity too large to be a float) is written as null instead.
    """
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: standard_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [standard_json(value) for value in payload]
    return payload


def dumps_json(payload, indent: int | None = 2) -> str:
    """``payload`` as standard JSON text (see `standard_json`); anything else JSON cannot hold raises TypeError."""
    return json.dumps(standard_json(payload), indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` to ``path`` as standard JSON (`dumps_json`), atomically."""
    text = dumps_json(payload) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable_dir(folder: str | os.PathLike, option: str, folders: Sequence[str] = (),
                       files: Sequence[str] = ()) -> None:
    """Refuse, naming ``option``, a folder a command will write that it cannot: one that is a file, lies under a
    file, or whose nearest existing ancestor is not writable; ``folders`` and ``files`` are names the command
    will create inside it, refused as a file where a folder must go (and the reverse).

    Called before any work: otherwise the mistake is found only when the first result is written, after a
    training or a benchmark whose work is then lost.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder}: is a file, expected a folder")
    _check_creatable(folder, option, folder)
    for name in folders:
        if (folder / name).exists() and not (folder / name).is_dir():
            raise ValueError(f"{option} {folder}: {folder / name} is a file, but the command writes a folder there")
    for name in files:
        if (folder / name).is_dir():
            raise ValueError(f"{option} {folder}: {folder / name} is a folder, but the command writes a file there")


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """Refuse, naming ``option``, a file path a command cannot write: an existing folder, a path under a file, or
    one whose nearest existing folder is not writable (`atomic_write` creates the missing ones). Called before
    any work, as `check_writable_dir`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, expected a file name (e.g. {path / 'plot.png'})")
    _check_creatable(path.parent, option, path)


def _check_creatable(folder: Path, option: str, target: Path) -> None:
    """``folder`` exists as a writable folder, or its nearest existing ancestor is one (it can be created)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise ValueError(f"{option} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {target}: {existing} is not writable (permission denied)")


def describe_os_error(err: OSError) -> str:
    """An OSError in one line, '<what went wrong>: <path>' (disk full, permission denied, read-only file system),
    or its own message when it was raised with one rather than by the system."""
    if err.strerror is None:
        return str(err)
    paths = [str(name) for name in (err.filename, err.filename2) if name is not None]
    return ": ".join([err.strerror, " -> ".join(paths)] if paths else [err.strerror])

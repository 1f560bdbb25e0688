"""One writer per run folder, and no silent overwrite of a previous run.

A process writing a run folder (checkpoints, results) holds an exclusive advisory lock, ``fcntl.flock`` on
``<folder>/.lock``, which holds its pid: a second writer is refused at once with a one-line error naming that pid.
The OS drops the lock when the process ends, crash or SIGKILL included, so a ``.lock`` file left behind never
blocks anyone; a clean exit removes it. A fresh run (not a resume) also refuses a folder holding a previous run's
outputs unless told to overwrite them, in which case those outputs are deleted first, under the lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderInUse(ValueError):
    """Another process holds the run folder's lock (the CLI reports it in one line, exit code 2)."""


@contextmanager
def locked_run_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock inside the block (the folder is created if needed); RunFolderInUse if another writer,
    in this process or another, holds it. A folder the block created and left empty is removed after."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder / LOCK_FILE)
    try:
        yield folder
    finally:
        (folder / LOCK_FILE).unlink(missing_ok=True)  # while still held: a process that opened it tries again
        os.close(fd)
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _acquire(path: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock, the pid written in it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderInUse(f"{path.parent} is in use by {holder}") from None
        if _is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed this file as it let go: lock the one at the path now


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def _is_current(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (not one unlinked after we opened it)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    locked = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


@contextmanager
def claim_run_folder(folder: str | os.PathLike | None, outputs: Sequence[str], *, resume: bool = False,
                     overwrite: bool = False, resumable: bool = True) -> Iterator[Path | None]:
    """Lock ``folder`` for a run writing it (nothing to do for None) and make sure it writes over no other run.

    outputs: names in the folder whose presence means a run wrote it (checkpoint folders, result files). A fresh
    run refuses such a folder with a one-line error, or with ``overwrite`` deletes them first; ``resume`` (the
    run continues the one in this folder) keeps them, and cannot be combined with ``overwrite``. resumable: the
    error suggests resuming too.
    """
    if folder is None:
        yield None
        return
    folder = Path(folder)
    if resume and overwrite:
        raise ValueError(f"{folder}: overwrite would delete the run being resumed; give one of --resume, --overwrite")
    with locked_run_folder(folder):
        if not resume:
            _clear_previous_run(folder, outputs, overwrite, resumable)
        yield folder


def _clear_previous_run(folder: Path, outputs: Sequence[str], overwrite: bool, resumable: bool) -> None:
    found = [name for name in outputs if (folder / name).exists()]
    if found and not overwrite:
        hint = "continue it with --resume, replace it with --overwrite" if resumable else "replace it with --overwrite"
        raise ValueError(f"{folder} already holds a checkpoint or results of another run ({', '.join(found)}): {hint}, "
                         "or choose another folder")
    for name in found:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

"""One writer per run folder, no silent overwrite: every command that writes a run folder (train, sparsify,
finetune, predictors) refuses one in use by another process (naming its pid) or holding a previous run (unless
--overwrite). The lock is checked with real second processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from leanformer._runfolder import LOCK_FILE, RunFolderInUse, locked_run_folder
from leanformer.cli.main import main

HOLDER = """
import sys
from leanformer._runfolder import locked_run_folder
with locked_run_folder(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A second Python process holding the lock of ``folder`` until the block ends (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_is_exclusive_across_processes_and_freed_by_a_crash(tmp_path):
    folder = tmp_path / "run"
    with held_by_another_process(folder) as holder:
        refused = pytest.raises(RunFolderInUse, match=rf"{re.escape(str(folder))} is in use by pid {holder.pid}")
        with refused, locked_run_folder(folder):
            pass
        holder.kill()  # SIGKILL: nothing of the holder runs any more, the OS drops its lock
        holder.wait()
    assert (folder / LOCK_FILE).exists()  # left behind by the crash, and harmless:
    with locked_run_folder(folder):
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
        refused = pytest.raises(RunFolderInUse, match=f"in use by pid {os.getpid()}")  # one writer, in-process too
        with refused, locked_run_folder(folder):
            pass
    assert not (folder / LOCK_FILE).exists()
    with locked_run_folder(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # a folder the lock created and nothing used is not left behind


def lock_holder(folder: Path) -> int | None:
    try:
        return int((folder / LOCK_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_two_trainings_into_one_output(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "leanformer", "train", "--img-size", "16", "--no-progress", "--output", str(out)]
    first = subprocess.Popen([*argv, "--epochs", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 300
        while lock_holder(out) != first.pid:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for extra in ([], ["--overwrite"]):  # --overwrite replaces a finished run, never a running one
            second = subprocess.run([*argv, "--epochs", "1", *extra], capture_output=True, text=True, timeout=900)
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip().splitlines() == [
                f"leanformer train: error: {out} is in use by pid {first.pid}"]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


@pytest.fixture
def commands(tiny_bert_dir, keyword_task_files, relu_dir, lm_text) -> dict[str, tuple[list[str], str, str]]:
    """command -> (a small run without --out, the output flag, a file only a finished run of it leaves)."""
    tasks = [f"{name}={train}::{test}" for name, (train, test) in keyword_task_files.items()]
    return {
        "train": (["train", "--img-size", "16", "--epochs", "1", "--no-progress"], "--output", "result.json"),
        "sparsify": (["sparsify", "--model", "swin_nano_patch2_window4_32", "--img-size", "16", "--val-fraction",
                      "0.03", "--steps", "3", "--relu-steps", "1", "--stages", "[[2, 0.1]]", "--lr", "1e-3",
                      "--batch-size", "8", "--eval-every", "3", "--no-progress"], "--out", "sparsity.json"),
        "finetune": (["finetune", "--base", str(tiny_bert_dir), "--tasks", *tasks, "--r", "8", "--active-r", "2",
                      "--steps", "4", "--batch-size", "8", "--eval-every", "4", "--compute", "gather",
                      "--no-progress"], "--out", "metrics.json"),
        "predictors": (["predictors", "--model", str(relu_dir), "--data", str(lm_text), "--steps", "5",
                        "--batches", "2", "--seq-len", "32", "--batch-size", "4", "--no-progress"], "--out",
                       "predictors.json"),
    }


COMMANDS = ("train", "sparsify", "finetune", "predictors")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_in_use_is_refused(command, commands, tmp_path, capsys):
    argv, flag, _ = commands[command]
    out = tmp_path / "out"
    with held_by_another_process(out) as holder:
        assert main([*argv, flag, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"leanformer {command}: error: {out} is in use by pid {holder.pid}"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_previous_run_is_refused_unless_overwrite(command, commands, tmp_path, capsys):
    argv, flag, marker = commands[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text('{"previous": true}')
    assert main([*argv, flag, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0], err
    assert "already holds a checkpoint or results" in err[0] and "--overwrite" in err[0], err
    assert json.loads((out / marker).read_text()) == {"previous": True}  # untouched
    assert main([*argv, flag, str(out), "--overwrite"]) == 0
    assert "previous" not in json.loads((out / marker).read_text())
    assert not (out / LOCK_FILE).exists()

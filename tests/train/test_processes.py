"""Real processes: SIGKILL mid-epoch then resume, and 2-process DDP against 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import PROCESS_ENV, run_leanformer

# a small but real run: compact Swin on 16px digits, no stochastic depth (DDP draws masks per process)
RUN = ["--model", "swin_nano_patch2_window4_32", "--img-size", "16", "--batch-size", "32", "--lr", "2e-3",
       "--model-arg", "drop_path_rate=0", "--no-progress"]


def train(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    return run_leanformer("train", *args, processes=processes)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = next((folder / "last").glob("state-*.safetensors"))
    return {k: v for k, v in load_file(str(state)).items() if k.startswith("model.")}


def without_key_bias(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key third of each qkv bias: softmax is shift-invariant, so its true gradient is exactly 0
    and AdamW turns the rounding noise left in it (which differs with the reduction order) into lr-sized
    steps. Every other weight must match."""
    out = dict(weights)
    for name, value in weights.items():
        if name.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[name] = torch.cat([q, v])
    return out


def completed_epochs(folder: Path) -> int:
    try:
        return json.loads((folder / "last" / "meta.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(*RUN, "--epochs", "3", "--output", str(straight))

    proc = subprocess.Popen([sys.executable, "-m", "leanformer", "train", *RUN, "--epochs", "3", "--output",
                             str(killed)], env=PROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while completed_epochs(killed) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert completed_epochs(killed) == 1, "the run should have finished its first epoch"
    time.sleep(0.5)  # well inside the second epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert completed_epochs(killed) == 1, "killed too late: the second epoch had already ended"

    train("--resume", str(killed), "--no-progress")
    assert completed_epochs(killed) == 3
    expected, got = final_weights(straight), final_weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_refuses_a_changed_configuration(tmp_path):
    train(*RUN, "--epochs", "1", "--output", str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "leanformer", "train", "--resume", str(tmp_path), "--lr", "1.0"],
                          capture_output=True, text=True, env=PROCESS_ENV, timeout=900)
    assert proc.returncode == 2 and "cannot change lr" in proc.stderr


def test_two_process_ddp_matches_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(*RUN, "--epochs", "1", "--output", str(single))
    proc = train(*RUN, "--epochs", "1", "--output", str(ddp), "--json", processes=2)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2
    expected, got = without_key_bias(final_weights(single)), without_key_bias(final_weights(ddp))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
    meta_single = json.loads((single / "last" / "meta.json").read_text())
    meta_ddp = json.loads((ddp / "last" / "meta.json").read_text())
    assert meta_ddp["history"][0]["val_acc"] == pytest.approx(meta_single["history"][0]["val_acc"], abs=2e-3)


def test_two_process_ddp_with_compressed_activations(tmp_path):
    proc = train(*RUN, "--epochs", "1", "--compress", "int8", "--output", str(tmp_path), "--json", processes=2)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["saved_activation_ratio"] < 0.3
    assert summary["final_val_acc"] > 0.2  # it learns (10 classes: chance is 0.1)

import json
import subprocess
import sys

import pytest
import torch

from leanformer.cli.main import main


def test_models_json(capsys):
    assert main(["models", "swin_t*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"model": "swin_tiny_patch4_window7_224", "params": 28_288_354, "img_size": 224, "gmacs": 4.494}]


def test_models_table_lists_both_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "msmlp_tiny" in out and "28,288,354" in out


def test_forward_on_digits(capsys):
    assert main(["forward", "--model", "swin_tiny_patch4_window7_224", "--img-size", "64", "--batch-size", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"] == [4, 1, 64, 64] and result["logits"] == [4, 10]
    assert len(result["labels"]) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["forward", "--model", "swin_tiny"], "did you mean"),
        (["forward", "--batch-size", "0"], "--batch-size"),
        (["forward", "--checkpoint", "/nonexistent.safetensors"], "does not exist"),
        (["models", "nothing*"], "no model matches"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "leanformer", *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_debug_shows_traceback():
    proc = subprocess.run([sys.executable, "-m", "leanformer", "--debug", "models", "nothing*"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leanformer", *argv], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--epochs", "0"], "epochs"),
        (["--model-arg", "drop_path_rate"], "KEY=VALUE"),
        (["--model", "swin_tiny_patch4_window7_224", "--model-arg", "depths=[2]"], "depths"),
        (["--resume", "/no/such/run"], "/no/such/run"),
        (["--weight-decay", "inf"], "weight_decay=inf"),
        (["--label-smoothing", "nan"], "label_smoothing=nan"),
        (["--clip-grad", "inf"], "clip_grad=inf"),
    ],
)
def test_train_errors_are_one_line_with_exit_code_2(argv, message, tmp_path):
    proc = run_cli("train", "--output", str(tmp_path / "out"), *argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    proc = run_cli("train", "--device", "cuda", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_train_on_cuda(compress, tmp_path):
    proc = run_cli("train", "--device", "cuda", "--compress", compress, "--img-size", "16", "--epochs", "1",
                   "--batch-size", "64", "--no-progress", "--json", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs_run"] == 1 and (tmp_path / "best" / "meta.json").is_file()


def test_train_on_an_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and str(tmp_path / "empty") in proc.stderr


def test_train_help_explains_every_option():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--data", "--epochs", "--batch-size", "--lr", "--img-size", "--seed", "--output",
                 "--resume", "--workers", "--json", "--model-arg", "--overwrite"):
        assert flag in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "already holds a checkpoint or results" in text and "in use" in text  # what --overwrite is for, and the lock


def test_train_json_summary(tmp_path):
    proc = run_cli("train", "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--no-progress", "--json",
                   "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs_run"] == 1 and 0.0 <= summary["best_val_acc"] <= 1.0 and summary["params"] > 0
    assert (tmp_path / "best" / "meta.json").is_file() and (tmp_path / "result.json").is_file()


def test_profile_reports_exact_and_compressed_bytes(tmp_path, capsys):
    png = tmp_path / "profile.png"
    assert main(["profile", "--model", "swin_nano_patch2_window4_32", "--batch-size", "2", "--compress", "int4",
                 "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["ratio"] < 0.2 and report["stored_bytes"] < report["original_bytes"]
    assert any(name.startswith("layers.0.blocks.0") for name in report["per_module"])
    assert png.stat().st_size > 0
    assert main(["profile", "--model", "swin_nano_patch2_window4_32", "--batch-size", "2", "--compress", "none",
                 "--plot", str(png)]) == 0
    assert "1.000x" in capsys.readouterr().out


def test_train_with_compression_reports_the_saving(tmp_path):
    proc = run_cli("train", "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--no-progress", "--json",
                   "--compress", "int8", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert 0.2 < summary["saved_activation_ratio"] < 0.3 and summary["config"]["compress"] == "int8"
    proc = run_cli("train", "--compress", "int3", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2 and "int8" in proc.stderr
    # the compression is part of the run: a resume keeps it and may not change it
    proc = run_cli("train", "--resume", str(tmp_path), "--compress", "int4")
    assert proc.returncode == 2 and "cannot change compress" in proc.stderr
    proc = run_cli("train", "--resume", str(tmp_path), "--epochs", "2", "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["config"]["compress"] == "int8" and resumed["epochs_run"] == 1
    assert 0.2 < resumed["saved_activation_ratio"] < 0.3


TINY = ["--img-size", "16", "--epochs", "1", "--batch-size", "64", "--no-progress", "--json"]


def test_train_refuses_an_output_holding_a_run_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--output", str(out)).returncode == 0
    first = (out / "last" / "meta.json").read_text()
    proc = run_cli("train", *TINY, "--seed", "1", "--output", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(out) in proc.stderr and "--overwrite" in proc.stderr and "--resume" in proc.stderr
    assert (out / "last" / "meta.json").read_text() == first  # untouched
    proc = run_cli("train", *TINY, "--seed", "1", "--output", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "result.json").read_text())["config"]["seed"] == 1
    assert json.loads((out / "last" / "meta.json").read_text())["config"]["seed"] == 1
    assert not (out / ".lock").exists()  # released and removed at the end


def test_train_refuses_a_forged_meta_json(tmp_path):
    assert run_cli("train", *TINY, "--output", str(tmp_path)).returncode == 0
    meta_path = tmp_path / "last" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(epoch=4, best_val_acc=0.999)
    meta_path.write_text(json.dumps(meta))
    proc = run_cli("train", "--resume", str(tmp_path), "--epochs", "1", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert str(meta_path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_train_stops_at_a_non_finite_loss(tmp_path):
    proc = run_cli("train", *TINY, "--lr", "1e30", "--warmup-epochs", "0", "--output", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "loss is nan at step 2" in line[0], proc.stderr
    assert not (tmp_path / "result.json").exists()

"""`leanformer sparsify` end to end: a tiny LLaMA folder on tinyshakespeare, a backbone on digits, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from leanformer import create_model, load_data, load_pretrained
from leanformer._hf import hf_progress_bars, load_causal_lm
from leanformer.cli import sparsify as sparsify_cli
from leanformer.cli.main import main
from leanformer.data import lm_eval_batches, load_text
from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.measure import measure_sparsity

transformers = pytest.importorskip("transformers")

SEQ_LEN, BATCH = 32, 4
RUN = ["--steps", "12", "--relu-steps", "4", "--stages", "[[4, 0.05], [8, 0.5]]", "--lr", "3e-3",
       "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--eval-every", "6", "--no-progress"]


@pytest.fixture
def llama_dir(tiny_llama, tmp_path) -> Path:
    return tiny_llama(tmp_path / "llama", "silu")


@pytest.fixture
def text_file(lm_text) -> Path:
    return lm_text


def interrupted(batches, after: int):
    for i, batch in enumerate(batches):
        if i == after:
            raise RuntimeError("interrupted")
        yield batch


def val_loss_and_sparsity(model, text_file: Path) -> tuple[float, float]:
    """What sparsify reports, recomputed: mean next-token loss and sparsity on the last tenth of the file."""
    batches = lm_eval_batches(load_text(text_file, 0.1, SEQ_LEN).val, BATCH, SEQ_LEN)
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches]
    count = sum(y.numel() for _, y in batches)
    return float(sum(losses)) / count, measure_sparsity(model, [x for x, _ in batches]).average_sparsity


def test_llama_end_to_end(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sparsify", "--model", str(llama_dir), "--data", str(text_file), *RUN, "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["schedule"] == [[4, 0.0], [8, 0.05], [12, 0.5]] and summary["config"]["threshold"] == 0.01
    assert summary["initial_sparsity"] < 0.01 < summary["final_sparsity"]
    saved = json.loads((out / "sparsity.json").read_text())
    assert [entry["step"] for entry in saved["history"]] == [6, 12]
    assert len(saved["report"]["layers"]) == 2 and "relufy(model, ReLUConfig('fatrelu', 0.01))" in saved["activation"]
    assert (out / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint" / "meta.json").is_file()

    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644  # shareable, as every file we write
    with hf_progress_bars(False):
        with pytest.raises(ValueError, match="leanformer.load_pretrained"):  # transformers has no FATReLU
            load_causal_lm(out)
        model = load_pretrained(out)
    x = torch.randn(3, 64)
    for ffn in find_ffns(model):  # reloaded: FATReLU(0.01), the activation the figures were measured with
        assert torch.equal(ffn.act(x), x.masked_fill(x < 0.01, 0))
    loss, sparsity = val_loss_and_sparsity(model, text_file)
    assert loss == pytest.approx(saved["final_val_loss"], rel=1e-6)
    assert sparsity == pytest.approx(saved["final_sparsity"], abs=1e-12)


def test_llama_resume_is_bit_identical(llama_dir, text_file, tmp_path, monkeypatch):
    args = ["sparsify", "--model", str(llama_dir), "--data", str(text_file), *RUN, "--threshold", "0"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    original = sparsify_cli.lm_batches
    monkeypatch.setattr(sparsify_cli, "lm_batches", lambda *a, **k: interrupted(original(*a, **k), after=8))
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    assert main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0

    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    saved = json.loads((tmp_path / "killed" / "sparsity.json").read_text())
    assert saved["start_step"] == 6 and "from_pretrained gives the sparsified model as it is" in saved["activation"]
    with hf_progress_bars(False):
        model = load_causal_lm(tmp_path / "killed")  # threshold 0: from_pretrained gives it exactly
    assert val_loss_and_sparsity(model, text_file)[1] == pytest.approx(saved["final_sparsity"], abs=1e-12)


def test_backbone_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sparsify", "--model", "swin_nano_patch2_window4_32", "--img-size", "16", "--val-fraction", "0.03",
                 "--steps", "3", "--relu-steps", "1", "--stages", "[[2, 0.1]]", "--lr", "1e-3", "--batch-size", "8",
                 "--eval-every", "3", "--no-progress", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    fresh = lambda: create_model("swin_nano_patch2_window4_32", in_chans=1, num_classes=10, img_size=16)
    with pytest.raises(ValueError, match="load_pretrained"):  # a plain load would give GELU FFNs
        create_model("swin_nano_patch2_window4_32", checkpoint_path=out / "model.safetensors", in_chans=1,
                     num_classes=10, img_size=16)
    model = load_pretrained(out, fresh())
    val = load_data("digits", img_size=16, val_fraction=0.03).val
    report = measure_sparsity(model, [x for x, _ in DataLoader(val, batch_size=8)])
    assert report.average_sparsity == pytest.approx(summary["final_sparsity"], abs=1e-12)
    assert "FATReLU(threshold=0.01) recorded" in summary["activation"] and (out / "sparsity.png").is_file()


def test_help_explains_the_three_steps(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sparsify", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(step in text for step in ("(1)", "(2)", "(3)", "ReLU", "FATReLU", "--resume", "--threshold"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "{tmp}/missing"], "no such folder"),
    (["--model", "{tmp}"], "no config.json"),
    (["--model", "{bert}"], "not a causal language model"),
    (["--model", "{llama}"], "--data"),
    (["--model", "{llama}", "--data", "{tmp}/missing.txt"], "missing.txt"),
    (["--model", "{llama}", "--data", "{empty}"], "empty.txt"),
    (["--model", "{llama}", "--data", "{text}", "--lr", "-1"], "lr=-1"),
    (["--model", "{llama}", "--data", "{text}", "--steps", "0"], "steps=0"),
    (["--model", "{llama}", "--data", "{text}", "--threshold", "-0.1"], "threshold"),
    (["--model", "{llama}", "--data", "{text}", "--stages", "[[4,"], "--stages"),
    (["--model", "{llama}", "--data", "{text}", "--resume", "--out", "{tmp}/run"], "no checkpoint"),
    (["--model", "{llama}", "--data", "{text}", "--checkpoint", "w.safetensors"], "--checkpoint"),
    (["--model", "swin_nano_patch2_window4_32", "--batch-size", "0"], "batch_size"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, llama_dir, text_file, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (tmp_path / "empty.txt").write_bytes(b"")
    paths = {"tmp": tmp_path, "bert": bert, "llama": llama_dir, "text": text_file, "empty": tmp_path / "empty.txt"}
    assert main(["sparsify", *(arg.format(**paths) for arg in argv), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_exit_code_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leanformer", "sparsify", "--model", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr

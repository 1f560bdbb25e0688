"""`leanformer generate`: exact sparse decoding gives the dense tokens, the recorded FATReLU threshold is applied,
predictor mode runs on predictors from `leanformer predictors`, paths are reported, errors are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from leanformer._hf import hf_progress_bars, load_causal_lm
from leanformer.cli.main import main
from leanformer.data import decode_tokens, encode_text
from leanformer.sparsity import ReLUConfig, relufy

pytest.importorskip("transformers")

PROMPT = "To be, or not"
NEW = 10
FAST = ["--max-new-tokens", str(NEW), "--max-active", "1", "--no-progress"]  # max_active 1: always the sparse path


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    """The PyTorch sparse path: the compiled kernels are tested in tests/sparsity, and a first-use build is slow."""
    monkeypatch.setenv("LEANFORMER_NATIVE", "0")


def generate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def reference_ids(folder: Path, threshold: float = 0.0) -> list[int]:
    """Greedy decoding of PROMPT with transformers alone (ReLU, or FATReLU(threshold) as sparsify's note says)."""
    with hf_progress_bars(False):
        model = load_causal_lm(folder).eval()
    if threshold:
        relufy(model, ReLUConfig("fatrelu", threshold))
    ids = encode_text(PROMPT)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_exact_mode_gives_the_dense_tokens_and_reports_its_paths(relu_dir, capsys):
    result = generate_json(capsys, "--model", str(relu_dir), "--prompt", PROMPT, "--compare", *FAST)
    assert result["identical_tokens"] is True and result["sparse"] == "exact"
    assert result["token_ids"] == reference_ids(relu_dir)
    assert result["text"] == PROMPT + decode_tokens(torch.tensor(result["token_ids"]))
    assert result["new_tokens"] == len(result["token_ids"]) == result["dense"]["new_tokens"]
    paths = result["paths"]
    assert paths["calls"] == {"sparse-torch": 2 * result["new_tokens"]}  # 2 FFNs, one forward per new token
    assert 0 < paths["computed_fraction"] < 1 and set(paths["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert result["tokens_per_s"] > 0 and result["speedup"] > 0 and result["activation"] == "config.hidden_act 'relu'"


def test_the_threshold_recorded_by_sparsify_is_applied(fatrelu_dir, capsys):
    result = generate_json(capsys, "--model", str(fatrelu_dir), "--prompt", PROMPT, *FAST)
    assert result["activation"] == "FATReLU(threshold=0.05) from sparsity.json"
    assert result["token_ids"] == reference_ids(fatrelu_dir, 0.05)
    override = generate_json(capsys, "--model", str(fatrelu_dir), "--prompt", PROMPT, "--threshold", "0.2", *FAST)
    assert override["activation"] == "FATReLU(threshold=0.2) from --threshold"
    assert override["paths"]["computed_fraction"] < result["paths"]["computed_fraction"]  # a higher threshold


def test_predictor_mode_uses_the_predictors_file(predictors_dir, capsys):
    result = generate_json(capsys, "--model", str(predictors_dir), "--prompt", PROMPT, "--sparse", "predictor",
                           "--compare", *FAST)
    assert result["sparse"] == "predictor" and isinstance(result["identical_tokens"], bool)
    # the prompt's first position (the attention sink) dense in both FFNs, every call predicted for the rest
    assert result["paths"]["calls"] == {"sparse-torch": 2 * result["new_tokens"], "dense": 2}
    assert 0 < result["paths"]["computed_fraction"] <= 1


def test_dense_decoding_and_the_text_output(relu_dir, capsys):
    assert main(["generate", "--model", str(relu_dir), "--prompt", PROMPT, "--sparse", "off", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and "tokens/s" in out and "FFN paths" not in out
    assert main(["generate", "--model", str(relu_dir), "--prompt", PROMPT, "--compare", *FAST]) == 0
    out = capsys.readouterr().out
    assert "sparse-torch 20 calls" in out and "identical tokens: yes" in out


def test_help_explains_the_modes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(word in text for word in ("exact", "predictor", "tokens/s", "sparsity.json", "leanformer predictors",
                                         "(default: 64)"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "{tmp}/missing"], "no such folder"),
    (["--model", "{relu}", "--sparse", "predictor"], "`leanformer predictors --model"),
    (["--model", "{relu}", "--sparse", "predictor", "--predictors", "{tmp}/none.safetensors"], "none.safetensors"),
    (["--model", "{silu}"], "activation SiLUActivation is not sparse"),
    (["--model", "{silu}", "--threshold", "0.1"], "hidden_act is 'silu'"),
    (["--model", "{relu}", "--threshold", "-1"], "--threshold=-1.0"),
    (["--model", "{bad_json}"], "sparsity.json: config.threshold='high'"),
    (["--model", "{relu}", "--sparse", "off", "--compare"], "--compare"),
    (["--model", "{relu}", "--predictors", "{tmp}/p.safetensors"], "--sparse predictor only"),
    (["--model", "{relu}", "--max-active", "2"], "--max-active '2'"),
    (["--model", "{relu}", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--model", "{relu}", "--prompt", ""], "encodes to no tokens"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, relu_dir, silu_dir, tmp_path, capsys):
    bad_json = tmp_path / "bad"
    shutil.copytree(relu_dir, bad_json)
    (bad_json / "sparsity.json").write_text(json.dumps({"config": {"threshold": "high"}}))
    paths = {"tmp": tmp_path, "relu": relu_dir, "silu": silu_dir, "bad_json": bad_json}
    argv = [arg.format(**paths) for arg in argv]
    prompt = [] if "--prompt" in argv else ["--prompt", PROMPT]
    assert main(["generate", *argv, *prompt, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err

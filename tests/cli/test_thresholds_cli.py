"""`leanformer thresholds`, `leanformer generate --engine compiled` and `leanformer tune`: a SiLU model made sparse
without training decodes with the compiled decoder to the thresholded model's own tokens; errors are one line."""

from __future__ import annotations

import json

import pytest

from leanformer._native import kernels
from leanformer.cli.main import main
from leanformer.sparsity import InputSparseLinear, load_pretrained
from leanformer.sparsity.decode import DECODE_SOURCE

pytest.importorskip("transformers")
needs_kernels = pytest.mark.skipif(kernels(DECODE_SOURCE) is None, reason="no C++ compiler for the decode kernels")

PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def teal_dir(silu_dir, lm_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("teal") / "model"
    assert main(["thresholds", "--model", str(silu_dir), "--data", str(lm_text), "--sparsity", "0.4",
                 "--allocation", "uniform", "--out", str(out), "--no-progress", "--json"]) == 0
    return out


def generate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["generate", *argv, "--no-progress", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_thresholds_writes_a_model_that_reloads_with_its_thresholds(teal_dir):
    report = json.loads((teal_dir / "thresholds.json").read_text())
    assert report["method"] == "teal" and report["sparsity"] == pytest.approx(0.4)
    assert 0.3 < report["held_out_sparsity"] < 0.5  # measured on the held-out part of --data
    model = load_pretrained(teal_dir)
    linears = [m for m in model.modules() if isinstance(m, InputSparseLinear)]
    assert len(linears) == 2 * 7 and all(m.threshold > 0 for m in linears)


@needs_kernels
def test_compiled_engine_decodes_the_thresholded_model_exactly(teal_dir, capsys):
    compiled = generate_json(capsys, "--model", str(teal_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                             "--engine", "compiled")
    hf = generate_json(capsys, "--model", str(teal_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                       "--engine", "hf", "--sparse", "off")
    assert compiled["engine"] == "compiled" and hf["engine"] == "hf"
    assert compiled["token_ids"] == hf["token_ids"]
    assert compiled["paths"]["computed_fraction"] < 0.8  # the zeroed inputs' weights were skipped


@needs_kernels
def test_compiled_engine_on_a_relu_model_with_compare(relu_dir, capsys):
    result = generate_json(capsys, "--model", str(relu_dir), "--prompt", PROMPT, "--max-new-tokens", "10",
                           "--compare")
    assert result["engine"] == "compiled" and result["identical_tokens"] is True
    assert 0 < result["paths"]["computed_fraction"] < 1


@needs_kernels
def test_compiled_engine_runs_the_predictors(predictors_dir, capsys):
    result = generate_json(capsys, "--model", str(predictors_dir), "--prompt", PROMPT, "--max-new-tokens", "10",
                           "--sparse", "predictor", "--compare")
    assert result["engine"] == "compiled" and isinstance(result["identical_tokens"], bool)
    exact = generate_json(capsys, "--model", str(predictors_dir), "--prompt", PROMPT, "--max-new-tokens", "10")
    assert result["paths"]["computed_fraction"] <= exact["paths"]["computed_fraction"]  # predicted ⊆ active


def test_auto_engine_says_when_it_falls_back(relu_dir, capsys, monkeypatch):
    monkeypatch.setenv("LEANFORMER_NATIVE", "0")
    result = generate_json(capsys, "--model", str(relu_dir), "--prompt", PROMPT, "--max-new-tokens", "4")
    assert result["engine"] == "hf" and "compiled kernels" in result["engine_note"]  # said in the result


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--engine", "compiled", "--sparse", "off"], "--engine compiled decodes sparsely"),
    (["thresholds", "--sparsity", "1.5"], "sparsity"),
    (["thresholds", "--calibration-tokens", "0"], "--calibration-tokens"),
    (["tune", "--shape", "576by1536"], "--shape '576by1536'"),
    (["tune"], "nothing to measure"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, relu_dir, lm_text, tmp_path, capsys):
    command, rest = argv[0], argv[1:]
    if command == "generate":
        rest = ["--model", str(relu_dir), "--prompt", PROMPT, *rest]
    elif command == "thresholds":
        rest = ["--model", str(relu_dir), "--data", str(lm_text), "--out", str(tmp_path / "o"), *rest]
    capsys.readouterr()
    assert main([command, *rest]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@needs_kernels
def test_tune_measures_again_and_shows_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path))
    assert main(["tune", "--shape", "32x64"]) == 0
    out = capsys.readouterr().out
    assert "decoder layout for 32x64:" in out and str(tmp_path / "tuning") in out
    cached = json.loads(next((tmp_path / "tuning").glob("*.json")).read_text())
    entry = next(iter(cached["choices"]["decode_layout"].values()))
    assert entry["choice"] in ("rows", "cols") and set(entry["seconds"]) == {"rows", "cols"}
    assert "cpu_flags" in cached["machine"]  # the machine is recorded with its choices
    assert main(["tune", "--show"]) == 0 and "decode_layout" in capsys.readouterr().out

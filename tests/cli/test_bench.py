"""`leanformer bench sparse-ffn` on tiny shapes: every mode is timed and reported, --plot writes a PNG, --plain
refuses predictor mode, errors are one line."""

from __future__ import annotations

import json
import sys

import pytest

from leanformer.cli.main import main
from leanformer.sparsity.speed import SPEED_MODES

TINY = ["bench", "sparse-ffn", "--d-model", "32", "--d-ff", "64", "--runs", "2", "--layers", "2"]


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    """The PyTorch sparse path: the compiled kernels are tested in tests/sparsity, and a first-use build is slow."""
    monkeypatch.setenv("LEANFORMER_NATIVE", "0")


def test_json_has_every_mode_per_sparsity_and_the_machine(capsys):
    assert main([*TINY, "--sparsity", "0.5,0.9", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"cpu", "logical_cpus", "torch_threads"} <= set(result["machine"]) and result["plot"] is None
    assert [row["sparsity"] for row in result["results"]] == [0.5, 0.9]
    for row in result["results"]:
        assert row["gated"] and row["layers"] == 2 and row["runs"] == 2 and row["dense_s"] > 0
        for mode in SPEED_MODES:
            assert row[mode]["seconds"] > 0 and row[mode]["speedup"] > 0, mode
            assert 0 < row[mode]["computed_fraction"] <= 1 and row[mode]["paths"] == ["sparse-torch"], mode


def test_plain_ffns_leave_out_predictor_mode_and_print_a_table(capsys):
    assert main([*TINY, "--plain", "--sparsity", "0.8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plain FFN 32x64, batch 1, 2 layers, median of 2 runs;") and "torch thread(s)" in out
    assert "exact-torch" in out and "predictor" not in out


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "speed.png"
    assert main([*TINY, "--modes", "exact", "--plot", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG" and f"plot: {path}" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([*TINY, "--plot", str(tmp_path / "speed.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and len(err.strip().splitlines()) == 1


def test_help_explains_shapes_modes_and_memory(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "sparse-ffn", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(word in text for word in ("exact-torch", "predictor", "4096x11008", "GB", "(default: 1024)",
                                         "(default: 0.5,0.9)"))


def test_bench_needs_a_benchmark_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench"])
    assert exit_.value.code == 2 and "sparse-ffn" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--plain", "--modes", "predictor"], "--modes predictor: predictors choose the units of gated FFNs only"),
    (["--modes", "exact,fast"], "unknown mode(s) ['fast']"),
    (["--sparsity", "0.5,1"], "--sparsity '0.5,1'"),
    (["--sparsity", "half"], "--sparsity 'half'"),
    (["--runs", "0"], "--runs=0"),
    (["--d-ff", "0"], "--d-ff=0"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, capsys):
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err

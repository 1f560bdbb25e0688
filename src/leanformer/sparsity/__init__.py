"""Activation sparsity: find FFNs, measure their sparsity (Lazy Neuron), create it (ProSparse end to end),
turn it into faster inference (exact sparse FFNs, predictor-selected units), set it without training (TEAL/CATS
thresholds), and decode LLaMA-family LMs at the memory-bandwidth limit, dense or sparse (`fast_decoder`)."""

from .activations import FATReLU, ReLUConfig, TopK, TopKConfig, apply_topk, relufy, restore_activations
from .decode import DecodeConfig, FastDecoder, fast_decoder
from .ffn import FFN, FFN_SPECS, FFNSpec, find_ffns, structural_spec
from .inference import (
    INFERENCE_MODES,
    SparseGatedFFN,
    SparseInferenceConfig,
    SparseInputConv1D,
    SparseInputConv2d,
    SparseInputLinear,
    calibrate_max_active,
    desparsify,
    inference_report,
    sparsify_for_inference,
)
from .kernels import backend as sparse_kernel_backend
from .measure import LayerSparsity, SparsityReport, measure_sparsity
from .predictor import FILE_NAME as PREDICTORS_FILE
from .predictor import (
    LowRankPredictor,
    PredictorConfig,
    PredictorReport,
    Predictors,
    evaluate_predictors,
    record_ffn_activity,
    train_predictors,
)
from .pretrained import SPARSITY_FILE, WEIGHTS_NAME, CausalLM, load_pretrained, load_sparsified_lm, save_pretrained
from .prosparse_training import ProSparseConfig, ProSparseResult, causal_lm_loss, prosparse
from .regularize import PROSPARSE_7B, PROSPARSE_13B, ProSparseSchedule, SparsityRegularizer
from .speed import SPEED_MODES, time_sparse_ffn
from .thresholds import ALLOCATIONS as THRESHOLD_ALLOCATIONS
from .thresholds import METHODS as THRESHOLD_METHODS
from .thresholds import (
    InputSparseLinear,
    MagnitudeThreshold,
    ThresholdConfig,
    ThresholdReport,
    calibrate_thresholds,
    remove_thresholds,
    threshold_sparsity,
)
from .tune import best_decode_layout

__all__ = [
    "CausalLM",
    "DecodeConfig",
    "FATReLU",
    "FFN",
    "FFNSpec",
    "FFN_SPECS",
    "FastDecoder",
    "INFERENCE_MODES",
    "InputSparseLinear",
    "LayerSparsity",
    "LowRankPredictor",
    "MagnitudeThreshold",
    "PREDICTORS_FILE",
    "PROSPARSE_13B",
    "PROSPARSE_7B",
    "PredictorConfig",
    "PredictorReport",
    "Predictors",
    "ProSparseConfig",
    "ProSparseResult",
    "ProSparseSchedule",
    "ReLUConfig",
    "SPARSITY_FILE",
    "SPEED_MODES",
    "SparseGatedFFN",
    "SparseInferenceConfig",
    "SparseInputConv1D",
    "SparseInputConv2d",
    "SparseInputLinear",
    "SparsityRegularizer",
    "SparsityReport",
    "THRESHOLD_ALLOCATIONS",
    "THRESHOLD_METHODS",
    "ThresholdConfig",
    "ThresholdReport",
    "TopK",
    "TopKConfig",
    "WEIGHTS_NAME",
    "apply_topk",
    "best_decode_layout",
    "calibrate_max_active",
    "calibrate_thresholds",
    "causal_lm_loss",
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
    "remove_thresholds",
    "restore_activations",
    "save_pretrained",
    "sparse_kernel_backend",
    "sparsify_for_inference",
    "structural_spec",
    "threshold_sparsity",
    "time_sparse_ffn",
    "train_predictors",
]

"""Activation sparsity: find FFNs, measure their sparsity (Lazy Neuron), create it (ProSparse end to end)."""

from .activations import FATReLU, TopK, apply_topk, relufy
from .ffn import FFN, FFN_SPECS, FFNSpec, find_ffns
from .measure import LayerSparsity, SparsityReport, measure_sparsity
from .prosparse import ProSparseConfig, ProSparseResult, prosparse
from .regularize import PROSPARSE_7B, PROSPARSE_13B, ProSparseSchedule, SparsityRegularizer

__all__ = [
    "FFN",
    "FFN_SPECS",
    "PROSPARSE_13B",
    "PROSPARSE_7B",
    "FATReLU",
    "FFNSpec",
    "LayerSparsity",
    "ProSparseConfig",
    "ProSparseResult",
    "ProSparseSchedule",
    "SparsityRegularizer",
    "SparsityReport",
    "TopK",
    "apply_topk",
    "find_ffns",
    "measure_sparsity",
    "prosparse",
    "relufy",
]

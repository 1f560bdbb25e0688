"""Activation memory: compressed saved activations (Mesa) and saved-tensor accounting."""

from .compress import (
    COMPRESSION_PRESETS,
    OP_KINDS,
    CompressionConfig,
    compress_activations,
    compression_of,
    compression_stats,
    decompress_activations,
)
from .measure import SavedActivationReport, saved_activation_bytes

__all__ = [
    "COMPRESSION_PRESETS",
    "OP_KINDS",
    "CompressionConfig",
    "SavedActivationReport",
    "compress_activations",
    "compression_of",
    "compression_stats",
    "decompress_activations",
    "saved_activation_bytes",
]

"""Shared benchmark plumbing: machine description and robust interleaved timing (the library's own)."""

from __future__ import annotations

from pathlib import Path

from leanformer._machine import machine_info
from leanformer._timing import time_interleaved

__all__ = ["RESULTS", "machine_info", "time_interleaved"]

RESULTS = Path(__file__).resolve().parent / "results"

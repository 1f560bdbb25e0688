"""Shared benchmark plumbing: machine description and robust interleaved timing (the library's own)."""

from __future__ import annotations

from pathlib import Path

from leanformer._machine import machine_info
from leanformer._timing import time_interleaved
from leanformer._tuning import machine_key

__all__ = ["RESULTS", "machine_info", "results_file", "time_interleaved"]

RESULTS = Path(__file__).resolve().parent / "results"


def results_file(folder: Path, benchmark: str) -> Path:
    """``folder/benchmark/<this machine>.json``: results are kept per machine (named by what decides speed: CPU
    vendor, family, model, flags, torch, threads; see `leanformer._tuning.machine_key`), so a run on another CPU
    adds its own file instead of overwriting this one's. The plot is the same path with ``.png``."""
    return folder / benchmark / f"{machine_key()}.json"

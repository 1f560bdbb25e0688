"""Wall-clock timing that survives a noisy machine: warm-up, then interleaved runs, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["time_interleaved"]


def time_interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Median seconds per call of each function, runs interleaved so drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "runs_s": [round(v, 6) for v in s]} for name, s in samples.items()}

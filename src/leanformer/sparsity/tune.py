"""Which weight layout the compiled decoder streams fastest on this machine, measured and cached (`_tuning`).

The decoder's matrix-vector products read a weight either row by row ("rows": out x in, dot products) or input by
input ("cols": in x out, scaled rows summed). Both read every byte once; which is faster depends on the CPU's
prefetchers and caches, so it is timed here on the model's own shapes, with enough copies of each weight that
they do not stay in cache (a decode step reads each weight once). "rows" is the default; "cols" is chosen only
when it is faster by more than the noise margin.
"""

from __future__ import annotations

import math

import torch

from .._native import kernels as native_kernels
from .._native import source_digest
from .._timing import time_interleaved
from .._tuning import tuned
from .decode import DECODE_SOURCE

__all__ = ["MARGIN", "best_decode_layout", "time_layouts"]

MARGIN = 0.03  # "cols" must beat "rows" by this fraction to be chosen
# the kernels' source digest is part of the key: a choice measured on other kernels is measured again
_KERNELS = source_digest(DECODE_SOURCE)
_FLUSH_BYTES = 96 << 20


def time_layouts(shapes: list[tuple[int, int]], runs: int = 7) -> dict[str, float]:
    """Median seconds of one pass over ``shapes`` ((out, in) each) per layout, every weight read from memory."""
    native = native_kernels(DECODE_SOURCE)
    if native is None:
        raise RuntimeError("the compiled decode kernels are not available here")
    bytes_per_pass = sum(out * inp for out, inp in shapes) * 4
    copies = max(2, math.ceil(_FLUSH_BYTES / bytes_per_pass))
    generator = torch.Generator().manual_seed(0)
    weights = {layout: [[torch.randn(*((inp, out) if layout == "cols" else (out, inp)), generator=generator)
                         for out, inp in shapes] for _ in range(copies)] for layout in ("rows", "cols")}
    inputs = [torch.randn(inp, generator=generator) for _, inp in shapes]
    state = {"rows": 0, "cols": 0}

    def one_pass(layout: str) -> None:
        state[layout] = (state[layout] + 1) % copies
        for w, x in zip(weights[layout][state[layout]], inputs, strict=True):
            native.matvec(w, x, layout == "cols")

    timed = time_interleaved({layout: lambda layout=layout: one_pass(layout) for layout in ("rows", "cols")},
                             runs * copies, warmup=copies)
    return {layout: timed[layout]["median_s"] for layout in ("rows", "cols")}


def best_decode_layout(hidden: int, intermediate: int) -> str:
    """"rows" or "cols" for a LLaMA-family layer of these sizes on this machine (measured once, then cached)."""
    shapes = [(hidden, hidden), (intermediate, hidden), (hidden, intermediate)]

    def measure() -> dict:
        seconds = time_layouts(shapes)
        choice = "cols" if seconds["cols"] < seconds["rows"] * (1 - MARGIN) else "rows"
        return {"choice": choice, "seconds": seconds}

    return tuned("decode_layout", f"{hidden}x{intermediate}@{_KERNELS}", measure)["choice"]

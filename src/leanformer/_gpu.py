"""When the Triton kernels run: on CUDA tensors, where Triton is importable, unless switched off.

Every Triton kernel in leanformer has a PyTorch reference beside it, which is the fallback and the test oracle.
The kernels are chosen automatically for CUDA tensors; ``LEANFORMER_TRITON=0`` switches them off (the reference
then runs on the GPU too). ``LEANFORMER_TRITON=cpu`` also sends CPU tensors to them, which only makes sense under
``TRITON_INTERPRET=1`` (Triton's interpreter runs kernels on CPU tensors, slowly): that is how the test suite checks
the kernels, and the code paths that call them, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

__all__ = ["on_input_device", "triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it ships with torch's Linux CUDA wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should take these tensors: all on CUDA (or all on the CPU with
    ``LEANFORMER_TRITON=cpu``), Triton importable and ``LEANFORMER_TRITON`` not 0."""
    switch = os.environ.get("LEANFORMER_TRITON", "1")
    if switch == "0":
        return False
    wanted = ("cuda", "cpu") if switch == "cpu" else ("cuda",)
    return all(t.device.type in wanted for t in tensors) and triton_available()


def on_input_device(launch: Callable) -> Callable:
    """Run ``launch(tensor, ...)`` with its first argument's CUDA device current: Triton launches on the current
    device, and a model spread over GPUs hands over tensors on cuda:1 while cuda:0 is current."""

    @functools.wraps(launch)
    def wrapped(first: torch.Tensor, *args, **kwargs):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return launch(first, *args, **kwargs)

    return wrapped

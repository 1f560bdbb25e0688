"""Optional compiled CPU kernels, built on first use with ``torch.utils.cpp_extension`` and cached.

Every kernel here has a plain-PyTorch reference that is used instead when the build is impossible (no C++
compiler, no ninja) or switched off with ``LEANFORMER_NATIVE=0``; tests compare the two. The build takes
about a minute once per machine and torch version; the result is cached under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType


def source_digest(source: Path) -> str:
    """A short digest of the kernel source file ``source``: part of the key of any choice measured on it."""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:10]


def enabled() -> bool:
    """False when the user switched compiled kernels off (LEANFORMER_NATIVE=0)."""
    return os.environ.get("LEANFORMER_NATIVE", "1") != "0"


def _cflags() -> list[str]:
    """-O3 and OpenMP, plus AVX2/FMA/AVX-512 when this CPU has them (10x faster integer hashing than the
    x86-64 baseline's SSE2). OpenMP resolves to torch's own libgomp, already loaded (same soname).

    The flags are part of torch's cache key, so a build for one CPU is never reused on a CPU without them.
    """
    import torch

    flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU builds; without it, one thread
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
    return flags


def _import_load():
    """torch's JIT builder, imported without its warning that a CPU-only machine has no CUDA runtime."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    return load


@functools.cache
def _build(source: Path) -> ModuleType | None:
    name = source.stem
    try:
        load = _import_load()
        return load(name=f"leanformer_{name}", sources=[str(source)], extra_cflags=_cflags(),
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means "use the PyTorch path", said once
        warnings.warn(f"leanformer: could not build the compiled {name} kernels ({type(e).__name__}: {e}); "
                      "using the PyTorch path (slower, same results)", RuntimeWarning, stacklevel=3)
        return None


def kernels(source: Path) -> ModuleType | None:
    """The extension compiled from the C++ file ``source`` (each pillar names its own ``csrc/`` file; built on
    first call, named after the file), or None if disabled or unbuildable."""
    return _build(Path(source)) if enabled() else None

"""What a timing was measured on: CPU model, cores, torch threads and build. Figures mean little without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["available_memory_bytes", "check_fits_in_memory", "machine_info"]


# the instruction-set flags that decide which kernels are fast ("AMD EPYC" alone names Zen 3 and Zen 5 alike)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def machine_info() -> dict:
    """The CPU (model name, vendor, family/model/stepping and its SIMD flags, from /proc/cpuinfo on Linux), logical
    CPUs, torch's intra-op threads and versions: enough to tell apart machines that share a model name."""
    cpu = _cpuinfo()
    return {
        "cpu": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": cpu.get("vendor_id"),
        "cpu_family": _int_or_none(cpu.get("cpu family")),
        "cpu_model": _int_or_none(cpu.get("model")),
        "cpu_stepping": _int_or_none(cpu.get("stepping")),
        "cpu_flags": [flag for flag in SIMD_FLAGS if flag in (cpu.get("flags") or cpu.get("Features") or "").split()],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _cpuinfo() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def available_memory_bytes() -> int | None:
    """Memory the system can still give a process (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(needed_bytes: float, what: str) -> None:
    """Refuse, before anything is allocated, work whose estimated memory exceeds what this machine has free:
    trying would end in an allocator error (or the OOM killer) after minutes, not in one clear line."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise ValueError(f"{what} needs about {needed_bytes / 2**30:,.1f} GiB, but this machine has "
                         f"{available / 2**30:,.1f} GiB of memory available")

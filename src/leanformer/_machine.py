"""What a timing was measured on: CPU model, cores, torch threads and build. Figures mean little without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["available_memory_bytes", "check_fits_in_memory", "machine_info"]


def machine_info() -> dict:
    """The CPU's model name (from /proc/cpuinfo on Linux), logical CPUs, torch's intra-op threads and versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


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

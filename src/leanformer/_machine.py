"""What a timing was measured on: CPU model, cores, torch threads and build. Figures mean little without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["machine_info"]


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

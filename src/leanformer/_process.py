"""Facts about the running process."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """Resident memory now (Linux), or None where /proc is not available."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the peak (VmHWM) from the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB.

    Linux's VmHWM is reset by exec, unlike `ru_maxrss`, which a process started from a large parent
    inherits (so benchmark workers would all report their parent's peak); elsewhere ru_maxrss.
    """
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

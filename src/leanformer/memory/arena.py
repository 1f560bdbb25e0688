"""One reusable CPU buffer for the compressed activations of a training step.

Without it, each compressed activation is its own small, long-lived allocation made between the large,
short-lived fp32 activations of the forward. glibc's heap then cannot give the freed fp32 memory back
(small live blocks pin it) and every fresh large activation is page-faulted in again: on CPU the process
peak stays far above what is actually kept, and time goes to zeroing pages. Compressed codes are instead
carved from one buffer, reset when the last of them is released (after backward), and sized from the
largest step seen; anything that does not fit falls back to an ordinary allocation.
"""

from __future__ import annotations

import threading

import torch

_ALIGN = 64  # bytes: each carved block starts on a cache line


class StepArena:
    """A bump allocator of uint8 blocks, reset when every block handed out has been released."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._offset = 0  # bytes handed out from the buffer since the last reset
        self._overflow = 0  # bytes that did not fit, since the last reset
        self._live = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes``; call ``release()`` once when it is no longer used."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        with self._lock:
            self._live += 1
            if self._offset + size <= self.capacity:
                block = self._buffer[self._offset : self._offset + nbytes]
                self._offset += size
                return block
            self._overflow += size
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self) -> None:
        with self._lock:
            self._live -= 1
            if self._live:
                return
            if self._overflow:  # grow to hold the whole step next time
                needed = self._offset + self._overflow
                self._buffer = None  # free the old buffer before allocating the new one
                self._buffer = torch.empty(needed, dtype=torch.uint8)
            self._offset = self._overflow = 0

"""Which module is running right now: a stack maintained by forward pre/post hooks.

Saved-tensor hooks only see tensors; this tells them which module (by qualified name) saved each
one, for per-module accounting, per-site running ranges and name-based exclusion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class ModuleTracker:
    """Keeps `self.stack` of (name, module) for the modules whose forward is running."""

    def __init__(self, model: nn.Module, on_enter: Callable[[str, nn.Module], None] | None = None,
                 on_exit: Callable[[str, nn.Module], None] | None = None):
        self.stack: list[tuple[str, nn.Module]] = []
        self._on_enter, self._on_exit = on_enter, on_exit
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(name)))
            # always_call: the stack is popped even when forward raises
            self._handles.append(module.register_forward_hook(self._exit_hook(name), always_call=True))

    def _enter_hook(self, name: str):
        def hook(module, args):
            self.stack.append((name, module))
            if self._on_enter is not None:
                self._on_enter(name, module)
        return hook

    def _exit_hook(self, name: str):
        def hook(module, args, output):
            if self.stack and self.stack[-1][1] is module:
                self.stack.pop()
                if self._on_exit is not None:
                    self._on_exit(name, module)
        return hook

    @property
    def current(self) -> tuple[str, nn.Module | None]:
        return self.stack[-1] if self.stack else ("", None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()

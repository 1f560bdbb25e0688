"""Which module is running right now: a stack maintained by forward pre/post hooks.

Saved-tensor hooks only see tensors; this tells them which module (by qualified name) saved each
one, for per-module accounting, per-site running ranges and name-based exclusion.

The hooks are instances of small classes holding the tracker, not closures: `copy.deepcopy` copies
a closure as the same function (the copy's hooks would keep serving the original's tracker) and
pickle cannot store one at all, whereas these objects are copied and pickled with the model, each
copy bound to its own tracker. The hook handles pickle with the hook tables they point into.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class _Hook:
    """A hook of one module of a tracker: the tracker and the module's qualified name."""

    def __init__(self, tracker: ModuleTracker, name: str):
        self.tracker, self.name = tracker, name


class _EnterHook(_Hook):
    """Forward pre-hook: `tracker.enter(name, module)`."""

    def __call__(self, module: nn.Module, args) -> None:
        self.tracker.enter(self.name, module)


class _ExitHook(_Hook):
    """Forward hook: `tracker.exit(name, module)`."""

    def __call__(self, module: nn.Module, args, output) -> None:
        self.tracker.exit(self.name, module)


class ModuleTracker:
    """Keeps `self.stack` of (name, module) for the modules whose forward is running.

    `on_enter`/`on_exit` are called with (name, module) as a module's forward starts and ends; the model itself
    has the name "". Pass bound methods (or other picklable callables) if the model is to be pickled.
    """

    def __init__(self, model: nn.Module, on_enter: Callable[[str, nn.Module], None] | None = None,
                 on_exit: Callable[[str, nn.Module], None] | None = None):
        self.stack: list[tuple[str, nn.Module]] = []
        self._on_enter, self._on_exit = on_enter, on_exit
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(_EnterHook(self, name)))
            # always_call: the stack is popped even when forward raises
            self._handles.append(module.register_forward_hook(_ExitHook(self, name), always_call=True))

    def enter(self, name: str, module: nn.Module) -> None:
        self.stack.append((name, module))
        if self._on_enter is not None:
            self._on_enter(name, module)

    def exit(self, name: str, module: nn.Module) -> None:
        if self.stack and self.stack[-1][1] is module:
            self.stack.pop()
            if self._on_exit is not None:
                self._on_exit(name, module)

    @property
    def current(self) -> tuple[str, nn.Module | None]:
        return self.stack[-1] if self.stack else ("", None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()

"""Which modules a transform applies to: one language for every config, PEFT's ``target_modules``.

A selection is None (every module the transform can take), a tuple of names, each a full module name or its
last components (``"q_proj"`` selects ``model.layers.0.self_attn.q_proj``), or one string, a regular
expression a full module name must match (``r"model\\.layers\\.(1[0-9])\\.mlp"``). Shell patterns (``*.attn``)
are refused with the way to write them: a pattern silently matching nothing would apply a transform where it
was not wanted.
"""

from __future__ import annotations

import re

__all__ = ["check_targets", "selects"]

_GLOB = re.compile(r"[*?\[]")


def check_targets(field: str, value: object, special: tuple[str, ...] = ()) -> str | tuple[str, ...] | None:
    """``value`` as a selection (a tuple of names, a compiled-once regex string, None, or one of ``special``),
    or ValueError naming ``field``."""
    if value is None or value in special:
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{field}={value!r}: not a valid regular expression ({err})") from err
        return value
    if isinstance(value, (set, frozenset)):
        value = tuple(sorted(value))
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        extra = "".join(f", {s!r}" for s in special)
        raise ValueError(f"{field}={value!r}: expected module names (strings), a regular expression{extra} or None")
    globs = [v for v in value if _GLOB.search(v)]
    if globs:
        raise ValueError(f"{field}={tuple(value)!r}: {globs[0]!r} is a shell pattern; give names or name endings "
                         "(('attn',) selects every *.attn) or one regular expression string (r'.*\\.attn')")
    return tuple(value)


def selects(targets: str | tuple[str, ...] | None, name: str) -> bool:
    """Whether the selection ``targets`` takes the module called ``name``."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)

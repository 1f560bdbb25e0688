"""Value checks for config validation, shared by the pillars: bools are not numbers here, and a number is finite.

`check_real` and `check_int` are the one place a config field's number is validated, so every config refuses
NaN, infinities and ``True`` the same way, with the same message: ``name=value: expected ...``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value: object, minimum: float | None = None, maximum: float | None = None, *,
               min_open: bool = False, max_open: bool = False, none: str | None = None):
    """``value`` if it is a finite real number within the bounds (open ones excluded), else ValueError naming the
    field. none: what None means for this field (e.g. "no clipping"); None is then accepted and returned."""
    if value is None and none is not None:
        return None
    if not (is_real(value) and math.isfinite(value) and _within(value, minimum, maximum, min_open, max_open)):
        expected = f"a finite number{_range(minimum, maximum, min_open, max_open)}"
        raise ValueError(f"{name}={value!r}: expected {expected}{'' if none is None else f' or None ({none})'}")
    return value


def check_int(name: str, value: object, minimum: int | None = None, *, none: str | None = None):
    """``value`` if it is an integer (not a bool) >= minimum, else ValueError naming the field; none as in
    `check_real`."""
    if value is None and none is not None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}={value!r}: expected an integer{bound}{'' if none is None else f' or None ({none})'}")
    return value


def _within(value: float, minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> bool:
    above = minimum is None or (value > minimum if min_open else value >= minimum)
    below = maximum is None or (value < maximum if max_open else value <= maximum)
    return above and below


def _range(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f" {'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if max_open else '<='} {maximum:g}"
    return ""


def config_from_dict(cls: type, values: dict, what: str):
    """``cls(**values)`` for a config dataclass, refusing unknown keys by name (e.g. from a newer checkpoint)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} config field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)

"""Type checks for config validation, shared by the pillars: bools are not numbers here."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

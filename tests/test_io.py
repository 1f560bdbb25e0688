"""Files leanformer writes: standard JSON only (no bare NaN/Infinity), whatever the numbers."""

from __future__ import annotations

import json
import math

import pytest

from leanformer._io import dumps_json, write_json_atomic


def strict_loads(text: str):
    """json.loads that refuses the NaN/Infinity extensions Python's json accepts by default."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    payload = {"loss": math.nan, "perplexity": math.inf, "history": [{"val": -math.inf}, (1.5, math.nan)], "ok": 2}
    write_json_atomic(tmp_path / "r.json", payload)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert strict_loads(text) == {"loss": None, "perplexity": None, "history": [{"val": None}, [1.5, None]], "ok": 2}
    assert strict_loads(dumps_json(payload)) == strict_loads(text)
    assert payload["loss"] != payload["loss"]  # the caller's object is left as it was


def test_anything_else_json_cannot_hold_is_still_refused(tmp_path):
    with pytest.raises(TypeError):
        dumps_json({"x": object()})

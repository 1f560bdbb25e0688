"""Every transform on tiny configs of the model families users bring (benchmarks/compatibility.py holds the
families and the checks; the README's table is its output). A cell that cannot work must fail with a clear
message naming what is unsupported, never silently."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")

from benchmarks.compatibility import FAMILIES, REFUSED, TRANSFORMS, is_expected, run_cell  # noqa: E402


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_transform_works_on_family(family, transform):
    result = run_cell(family, transform)
    assert is_expected(family, transform, result), (REFUSED.get((family.name, transform)), result)


def test_at_least_twenty_families_from_transformers_and_timm():
    assert len({f.name for f in FAMILIES if f.source in ("transformers", "timm")}) >= 20

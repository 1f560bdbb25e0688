"""Every transform on tiny configs of the model families users bring (benchmarks/compatibility.py holds the
families and the checks; the README's table is its output). A cell that cannot work must fail with a clear
message naming what is unsupported, never silently."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")

from benchmarks.compatibility import FAMILIES, TRANSFORMS, run_cell  # noqa: E402

# cells that are refused on purpose, and the words the refusal must contain
UNSUPPORTED = {("Mixtral", "sparse"): "sparsify_for_inference does not support fused mixture-of-experts weights"}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_transform_works_on_family(family, transform):
    result = run_cell(family, transform)
    expected_refusal = UNSUPPORTED.get((family.name, transform))
    if expected_refusal:
        assert result["status"] == "fail" and expected_refusal in result["detail"], result
    else:
        assert result["status"] == "ok", result["detail"]


def test_at_least_twenty_families_from_transformers_and_timm():
    assert len({f.name for f in FAMILIES if f.source in ("transformers", "timm")}) >= 20

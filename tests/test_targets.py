"""The one module-selection language of every config (PEFT's target_modules): names or name endings, one regex."""

from __future__ import annotations

import pytest

from leanformer._targets import check_targets, selects

NAME = "model.layers.10.self_attn.q_proj"


def test_names_match_whole_components_and_a_string_is_a_full_regex():
    assert selects(None, NAME)
    assert selects(("q_proj",), NAME) and selects(("self_attn.q_proj",), NAME) and selects((NAME,), NAME)
    assert not selects(("proj",), NAME) and not selects(("attn.q",), NAME) and not selects((), NAME)
    assert selects(r"model\.layers\.1[0-9]\..*", NAME) and not selects(r"layers\.10", NAME)


def test_bad_selections_name_the_field():
    assert check_targets("target_modules", ["a", "b"]) == ("a", "b")
    assert check_targets("target_modules", {"b", "a"}) == ("a", "b")
    assert check_targets("target_modules", "all-linear", ("all-linear",)) == "all-linear"
    with pytest.raises(ValueError, match=r"target_modules='\(': not a valid regular expression"):
        check_targets("target_modules", "(")
    with pytest.raises(ValueError, match=r"exclude_modules=\('\*\.attn',\): '\*\.attn' is a shell pattern"):
        check_targets("exclude_modules", ("*.attn",))
    with pytest.raises(ValueError, match="target_modules=3: expected module names"):
        check_targets("target_modules", 3)

"""Shared test helpers: the reference fixtures in ../shared/fixtures and small builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


def load_reference_fixture(name: str) -> dict:
    """A fixture's reference state dict, input, expected features/logits and constructor config."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"reference fixture {path} is not available")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return {
            "config": json.loads(f.metadata()["config"]),
            "state": {k.removeprefix("state."): f.get_tensor(k) for k in keys if k.startswith("state.")},
            "input": f.get_tensor("input"),
            "features": f.get_tensor("features"),
            "logits": f.get_tensor("logits"),
        }


def assert_rejects_bad_images(model: torch.nn.Module, size: int) -> None:
    """Wrong channel count, too-small image and wrong rank each raise a ValueError that says so."""
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, size, size))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        model(torch.randn(1, 3, 2, size))
    with pytest.raises(ValueError, match="NCHW"):
        model(torch.randn(3, size, size))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""The engine example in the README runs as printed, and resumes: the docs stay true to the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def engine_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- engine example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no engine example block"
    return match.group(1)


def test_the_readme_engine_example_runs_and_resumes(tmp_path, monkeypatch, capsys):
    code = engine_example()
    assert len(code.strip().splitlines()) <= 25
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    last = capsys.readouterr().out
    assert "'step': 200" in last and "'zeros'" in last and "'acc'" in last
    meta = json.loads((tmp_path / "runs" / "mine" / "meta.json").read_text())
    assert [entry["step"] for entry in meta["history"]] == [50, 100, 150, 200]
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # a second new run there is refused
        exec(compile(code, "README.md", "exec"), {})
    resumed = code.replace('checkpoint=Checkpointing("runs/mine", {"job": "demo"}))',
                           'checkpoint=Checkpointing("runs/mine", {"job": "demo"}), resume=True)')
    assert resumed != code
    exec(compile(resumed, "README.md", "exec"), {})  # already at step 200: nothing left to train
    assert "'step': 200" in capsys.readouterr().out

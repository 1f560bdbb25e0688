"""The layout is an import rule (DESIGN.md): the engine imports no pillar; a pillar (memory, sparsity, adapters,
train) imports `models`, `data`, `engine` and the shared helpers (`leanformer/_*.py`), never another pillar;
`cli` imports the pillars' public API only (their packages, not their modules); nothing imports `cli`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "leanformer"
PILLARS = {"memory", "sparsity", "adapters", "train"}
HELPERS = {"models", "data"}


def imports(path: Path) -> set[tuple[str, ...]]:
    """The leanformer modules ``path`` imports, as dotted parts below ``leanformer`` (relative imports resolved)."""
    package = path.relative_to(PACKAGE).parts[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                module = (*base, *(node.module.split(".") if node.module else ()))
                found |= {(*module, alias.name) if not node.module else module for alias in node.names}
            elif node.module and node.module.split(".")[0] == "leanformer":
                found.add(tuple(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found |= {tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "leanformer"}
    return {parts for parts in found if parts}


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        owner = parts[0] if len(parts) > 1 else None  # None: a shared helper at the top (or __init__/__main__)
        for target in imports(path):
            top = target[0]
            where = f"{path.relative_to(PACKAGE)} imports leanformer.{'.'.join(target)}"
            if top == "cli" and owner != "cli" and path.name != "__main__.py":
                found.append(f"{where}: nothing imports cli")
            elif owner == "engine" and top in PILLARS | HELPERS:
                found.append(f"{where}: the engine imports no pillar")
            elif owner in PILLARS and top in PILLARS and top != owner:
                found.append(f"{where}: pillars compose through the public API, not each other")
            elif owner in HELPERS and top in PILLARS | {"engine"}:
                found.append(f"{where}: models/ and data/ serve the pillars, they do not use them")
            elif owner == "cli" and top != "cli" and len(target) > 1 and not top.startswith("_"):
                found.append(f"{where}: cli uses the public API (leanformer.{top}), not its modules")
    return found


def test_the_import_rule_holds():
    assert violations() == []


def test_the_rule_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: what breaks the rule is reported, what keeps it is not."""
    fake = tmp_path / "leanformer"
    for folder in ("train", "cli", "engine"):
        (fake / folder).mkdir(parents=True)
    (fake / "train" / "loop.py").write_text("from ..memory import compress_activations\n"
                                            "from ..engine.checkpoint import save_checkpoint\n")
    (fake / "cli" / "x.py").write_text("from ..sparsity.kernels import backend\nfrom ..sparsity import relufy\n")
    (fake / "engine" / "__init__.py").write_text("from . import loop\nfrom ..train import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == [
        "cli/x.py imports leanformer.sparsity.kernels: cli uses the public API (leanformer.sparsity), not its modules",
        "engine/__init__.py imports leanformer.train: the engine imports no pillar",
        "train/loop.py imports leanformer.memory: pillars compose through the public API, not each other"]

"""The rooms of vlmpipe import only what docs/architecture.md says they may.

A room is a folder of the package (``core``, ``loop``, ``models``, ...). The rules keep each stage's
DVC deps small and true: models never reach data or training code, a model's wing never reaches
another model's, and nothing hashed reaches the output-neutral ``ops`` except through the doors
``tests/test_dvc_deps.py`` names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vlmpipe"
WINGS = ("siglip", "qa", "captioner", "chat")
BASE = {"core"}
MAY_IMPORT = {
    "core": BASE,
    "loop": BASE | {"loop", "models"},
    "models": BASE | {"models"},
    "data": BASE | {"data", "models"},
    "sources": BASE | {"sources", "data"},
    "scoring": BASE | {"scoring", "data", "models"},
    **{w: BASE | {w, "loop", "models", "data", "scoring"} for w in WINGS},
    "embeddings": BASE | {"embeddings", "models", "data"},
    "evaluate": BASE | {"evaluate", "data", "scoring"},
    "explore": BASE | {"explore"},
    "face": BASE | {"face", "models", "data", "scoring", "embeddings", *WINGS},
}
# Single files a room may read from a room it may not import as a whole.
MAY_READ = {"embeddings": {"vlmpipe/captioner/params.py"}}


def _room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _imported(f: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmpipe"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vlmpipe")}
    return out


def _files(name: str) -> set[str]:
    """Project files a dotted ``vlmpipe...`` name can be (a module, or a package's __init__)."""
    p = ROOT.joinpath(*name.split("."))
    return {str(f.relative_to(ROOT)) for f in (p.with_suffix(".py"), p / "__init__.py") if f.is_file()}


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_a_room_imports_only_what_it_may(room):
    bad = []
    for f in sorted((PKG / room).rglob("*.py")):
        for name in _imported(f):
            for target in _files(name):
                other = _room(ROOT / target)
                if other in ("", "ops") or other in MAY_IMPORT[room] or target in MAY_READ.get(room, ()):
                    continue  # the package root; ops is test_dvc_deps's business (its doors)
                bad.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_every_room_is_in_the_map():
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(MAY_IMPORT) | {"ops"}, rooms ^ (set(MAY_IMPORT) | {"ops"})
    text = (ROOT / "docs/architecture.md").read_text()
    assert all(f"`{r}/`" in text for r in rooms), [r for r in rooms if f"`{r}/`" not in text]

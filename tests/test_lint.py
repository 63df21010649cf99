"""The linters run as tests: ruff (check and format) and mypy --strict over the tree."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_linter_is_clean(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=TOP, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


LAYERS = ("base", "world", "state", "decide", "act", "service", "edges")
"""kmodd's subpackages, each allowed to import only itself and those before it."""


def test_each_layer_imports_only_the_layers_below_it() -> None:
    """The tree's layout is its architecture: reading the world never reaches into
    doing, the core never into the edges (imports checked with the ast, so a late
    import inside a function counts too)."""
    wrong = []
    packages = sorted(p.name for p in (TOP / "kmodd").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS), "a new subpackage needs its place in LAYERS"
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for path in sorted((TOP / "kmodd" / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), os.fspath(path))):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "kmodd" and len(parts) > 1 and parts[1] not in allowed:
                        wrong.append(f"{path.relative_to(TOP)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)

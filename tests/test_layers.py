"""The layers a reader can rely on: storage at the bottom, domain code without Prefect, Zarr only in storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# layer -> top-level packages it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "storage": {"pipelines", "tasks", "flows", "prefect", "dask", "distributed"},
    "pipelines": {"tasks", "flows", "prefect"},
    "tasks": {"flows"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names of every import statement in a file, including those inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_is_below_it(layer: str) -> None:
    leaks = {f"{path.relative_to(ROOT)} imports {sorted(imported_roots(path) & FORBIDDEN[layer])}"
             for path in sorted((ROOT / layer).glob("*.py")) if imported_roots(path) & FORBIDDEN[layer]}
    assert not leaks


def test_only_storage_opens_zarr_stores() -> None:
    opened = []
    for layer in ("pipelines", "tasks", "flows"):
        for path in sorted((ROOT / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "zarr"
                        and node.attr.startswith("open")):
                    opened.append(f"{path.relative_to(ROOT)}:{node.lineno} zarr.{node.attr}")
    assert not opened

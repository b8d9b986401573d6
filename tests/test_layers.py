"""The layers a reader can rely on: storage at the bottom, domain code without Prefect, Zarr only in storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("storage", "pipelines", "tasks", "flows")
# layer -> top-level packages it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "storage": {"pipelines", "tasks", "flows", "prefect", "dask", "distributed"},
    "pipelines": {"tasks", "flows", "prefect"},
    "tasks": {"flows"},
}


def layer_of(module: str) -> str:
    """`aselect.pipelines.config` -> `aselect.pipelines`'s layer, `pipelines`; other packages by their top name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "aselect" and len(parts) > 1 else parts[0]


def imported_roots(path: Path) -> set[str]:
    """Layers and top-level packages of every import statement in a file, including those inside functions."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {layer_of(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(layer_of(node.module))
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


def module_imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports at module level (lazy imports inside functions excluded)."""
    graph: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in (ROOT / layer).glob("*.py"):
            deps = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aselect."):
                    module = node.module.removeprefix("aselect.")
                    # `from aselect.pipelines import backbone` names a module; `from aselect.pipelines.x import y`, x
                    deps |= {f"{module}.{a.name}" for a in node.names} if "." not in module else {module}
                elif isinstance(node, ast.Import):
                    deps |= {a.name.removeprefix("aselect.") for a in node.names
                             if a.name.startswith("aselect.") and a.name.count(".") > 1}
            graph[f"{layer}.{path.stem}"] = deps
    return graph


def test_no_import_circle() -> None:
    graph = module_imports()
    assert graph["pipelines.pretrain"] >= {"pipelines.backbone", "pipelines.models"}  # the walk sees imports
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module])
    assert not circles

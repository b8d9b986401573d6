"""Code digests: the part of a stage key that covers the code computing the stage.

A stage's key must change when the code that computes its output changes, without anyone remembering to bump a
version. So a stage names its root module (its task module), and its digest hashes the syntax tree of that module
and of every `aselect` module it imports, transitively, within the packages that compute (`pipelines`, `storage`).
Syntax trees, not bytes: comments, docstrings and formatting do not change what a stage computes, so editing them
recomputes nothing. As DVC does with a stage's code dependencies, but found from the imports instead of listed.

Not followed: other stages' task modules (a stage reads their output through its upstream keys, which already
cover their code) and the modules in `NOT_COMPUTING`, whose effect on a stage's output reaches it only through
values the key already holds (the config section) or not at all (manifests, locks, error types, failpoints).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

FOLLOWED = ("aselect.pipelines", "aselect.storage")
NOT_COMPUTING = frozenset({
    "aselect.pipelines.config",  # config models: their values are in every stage's key already
    "aselect.storage.code",  # this module
    "aselect.storage.stages",  # keys, manifests, locks
    "aselect.storage.errors",  # error types
    "aselect.storage.faults",  # failpoints for the fault tests, inert unless set
})


# ---------------------------------------------------------------------------------------------
#                                   One module's syntax tree
# ---------------------------------------------------------------------------------------------


def source_file(name: str) -> Path | None:
    """The source file of a module (the loaded module's `__file__`, else where the import system finds it); None
    when `name` is no module (`from aselect.x import some_function` names a function)."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin) if origin is not None else None


def module_file(name: str) -> Path:
    """The source file of a module that must have one."""
    path = source_file(name)
    if path is None:
        raise ModuleNotFoundError(f"{name}: no source file to hash")
    return path


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(digest of the docstring-free syntax tree, the `aselect` modules it imports) of one source file."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    imports: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from aselect.pipelines import backbone` imports a module; `from aselect.x import f` a name in one
            imports += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    tree = _strip_docstrings(tree)
    digest = hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()
    return digest, tuple(sorted({m for m in imports if m.startswith("aselect.")}))


def _module_tree(name: str) -> tuple[str, tuple[str, ...]]:
    path = module_file(name)
    stat = path.stat()
    return _parsed(str(path), stat.st_mtime_ns, stat.st_size)


# ---------------------------------------------------------------------------------------------
#                                   A stage's code
# ---------------------------------------------------------------------------------------------


def code_modules(*roots: str) -> list[str]:
    """The `roots` and every module they import, transitively, within `FOLLOWED` and outside `NOT_COMPUTING`."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or (name not in roots and (name in NOT_COMPUTING or not name.startswith(FOLLOWED))):
            continue
        if source_file(name) is None:  # `from aselect.pipelines.x import some_function`
            continue
        seen.add(name)
        todo += _module_tree(name)[1]
    return sorted(seen)


def code_digest(*roots: str) -> str:
    """A digest of the code a stage runs: the syntax trees of `code_modules(*roots)`, docstrings and comments
    ignored."""
    digest = hashlib.sha256()
    for name in code_modules(*roots):
        digest.update(f"{name}\0{_module_tree(name)[0]}\0".encode())
    return digest.hexdigest()[:16]

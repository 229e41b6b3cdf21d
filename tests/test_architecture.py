"""The layer rule of docs/ARCHITECTURE.md, checked on the source: dependencies point one way.

ops <- capture <- analysis <- plan <- rewrite <- api / schedule <- io <- cli, with the leaf
utilities (`_version`, `progress`) importable from anywhere. No module imports one of the
package's own modules inside a function (that hides circles); optional third-party packages may
be imported lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "regsurgery"

#: layer of each sub-package or top-level module; a module may import from its own layer or lower.
LAYERS = {
    "_version": -1, "progress": -1,
    "ops": 0,
    "capture": 1,
    "analysis": 2,
    "plan": 3,
    "rewrite": 4,
    "api": 5, "api_dropout": 5, "api_layerdrop": 5, "schedule": 5, "integrations": 5,
    "io": 6,
    "cli": 7, "__main__": 8, "__init__": 8,
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _dotted(path: Path) -> list[str]:
    return ["regsurgery", *path.relative_to(PACKAGE).with_suffix("").parts]


def _target(path: Path, node: ast.ImportFrom) -> list[str]:
    """Package-relative parts of what ``node`` imports, [] for third-party modules."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        return parts[1:] if parts[0] == "regsurgery" else []
    here = _dotted(path)
    if path.name != "__init__.py":
        here = here[:-1]
    base = here[: len(here) - (node.level - 1)]
    full = base + (node.module.split(".") if node.module else [])
    return full[1:]


def _own_imports(path: Path) -> list[tuple[ast.ImportFrom, list[str], bool]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                target = _target(path, child)
                if target or child.level:
                    found.append((child, target, in_function))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "regsurgery":
                        found.append((child, alias.name.split(".")[1:], in_function))  # type: ignore[arg-type]
            visit(child, inside)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_and_sit_at_module_level(path: Path):
    unit = _unit(path)
    assert unit in LAYERS, f"{path.name}: give {unit!r} a layer in LAYERS and docs/ARCHITECTURE.md"
    for node, target, in_function in _own_imports(path):
        where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
        assert not in_function, f"{where}: import of the package's own module inside a function"
        if not target:  # `from . import x` at the package root
            continue
        other = target[0]
        assert other in LAYERS, f"{where}: imports unknown unit {other!r}"
        assert LAYERS[other] <= LAYERS[unit], (
            f"{where}: {unit} (layer {LAYERS[unit]}) imports {other} (layer {LAYERS[other]}): "
            "dependencies must point down (docs/ARCHITECTURE.md)"
        )


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for path in _modules():
        name = ".".join(_dotted(path)[1:])
        deps = graph.setdefault(name, set())
        for _node, target, _ in _own_imports(path):
            if target:
                deps.add(".".join(target))
    names = set(graph)

    def resolve(dep: str) -> str | None:
        while dep and dep not in names:
            dep = dep.rpartition(".")[0]
        return dep or None

    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            r = resolve(d)
            if r is None or r == n or r.endswith("__init__") or n.endswith("__init__"):
                continue
            if state.get(r) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, n, r]))
            if state.get(r) is None:
                visit(r, [*stack, n])
        state[n] = 2

    for n in sorted(graph):
        if state.get(n) is None:
            visit(n, [])

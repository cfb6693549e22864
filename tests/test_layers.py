"""The package's layers: module-level imports form no circle, and each layer imports only below.

Read from the source (AST), so the check is exact and takes no imports: plans -> models ->
parallel -> runner / cli, with config at the bottom beside plans. An import inside a function
counts too (one there only to dodge a circle would hide the circle from Python, not from this).
"""

from __future__ import annotations

import ast
from pathlib import Path

import ditmesh

ROOT = Path(ditmesh.__file__).parent
# Module -> prefixes of ditmesh modules it must never import (a lower layer never looks up).
FORBIDDEN = {
    "ditmesh.config": ("ditmesh.",),
    "ditmesh.plans": ("ditmesh.",),
    "ditmesh.models": ("ditmesh.parallel", "ditmesh.runner", "ditmesh.cli", "ditmesh.bench"),
    "ditmesh.parallel": ("ditmesh.runner", "ditmesh.cli", "ditmesh.bench"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """ditmesh modules `path` imports anywhere in its body (`from a import b` counts a.b if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("ditmesh")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def test_no_import_circles():
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name):] + [name]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            # A package's own __init__ importing its modules is the package, not a circle.
            if not name.startswith(dep + ".") :
                visit(dep, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_layers_import_only_below():
    problems = [
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        for layer, forbidden in FORBIDDEN.items()
        if name == layer or name.startswith(layer + ".")
        for dep in deps
        if dep.startswith(forbidden) and not dep.startswith(layer)
    ]
    assert not problems, problems

"""The package's layout: one folder per concern, imports pointing down, no circles (README, Development)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "trainer"
# Lowest first: a module may import from its own concern and those before it, never after.
CONCERNS = ("core", "distributed", "sync", "lifecycle", "watch", "engine", "tasks", "commands")
TOP = len(CONCERNS)  # trainer/cli.py, trainer/__init__.py, trainer/__main__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    parts = module.split(".")
    return CONCERNS.index(parts[1]) if len(parts) > 2 and parts[1] in CONCERNS else TOP


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of this package in ``path``, at any depth (function bodies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            if node.module == "trainer" or (node.module.count(".") == 1 and node.module.split(".")[1] in CONCERNS):
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "trainer"]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target in imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # ``from pkg import name``: the module that defines it
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def test_every_import_points_down_the_concerns() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        for line, target in imports(path):
            if level(target) > level(here) and not (here == "trainer" and target.startswith("trainer.")):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports from a concern above the importer's own:\n" + "\n".join(upward)


def test_the_engine_never_imports_a_task() -> None:
    engine = [p for p in (PACKAGE / "engine").rglob("*.py")]
    named = [f"{p.name}: {t}" for p in engine for _, t in imports(p) if t.startswith("trainer.tasks")]
    assert not named


def test_no_import_circles() -> None:
    edges, seen, stack, circles = graph(), set(), [], []

    def visit(node: str) -> None:
        seen.add(node)
        stack.append(node)
        for target in sorted(edges[node]):
            if target in stack:
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in seen:
                visit(target)
        stack.pop()

    for node in sorted(edges):
        if node not in seen:
            visit(node)
    assert not circles, "\n".join(circles)


def test_the_readme_layout_names_every_folder() -> None:
    readme = (REPO / "README.md").read_text()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(CONCERNS)
    for folder in folders:
        assert f"`trainer/{folder}/`" in readme

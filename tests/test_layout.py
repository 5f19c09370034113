"""The code's shape: no import circles, a library that never imports the demo, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"app": ROOT / "app", "asgi_pprof": ROOT / "asgi-pprof" / "src" / "asgi_pprof"}
MAX_MODULE_LINES = 450  # "about 400": past it, a module is asking to be split


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        imported.update(name for name in names if name in known)
    return imported


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "open":
                found.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_there_is_no_import_circle() -> None:
    graph = import_graph()
    # A package's __init__ importing its own modules is how a package exports; not a circle.
    for package in PACKAGES:
        graph[package] = {m for m in graph[package] if not m.startswith(package + ".")}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_never_imports_the_demo() -> None:
    graph = import_graph()
    library = {name: imported for name, imported in graph.items() if name.startswith("asgi_pprof")}
    assert {name: i for name, i in library.items() if any(m.startswith("app") for m in i)} == {}
    for path in PACKAGES["asgi_pprof"].rglob("*.py"):
        assert "import app" not in path.read_text() and "from app" not in path.read_text()


def test_no_module_is_much_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > MAX_MODULE_LINES} == {}

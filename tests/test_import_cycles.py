"""How the library's modules import each other (issue 16): no module reaches into another's private
names, and no import cycle exists.

Imports inside functions count: they are how the cycles of `layertime/` hid (an edge at call time is
still an edge a reader has to follow). The two there were (bridge → prefetch → verify → pipeline →
bridge, and figures ↔ report) went with the hub/ and report/ packages (issue 16).
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "layertime"


def _module(path: Path) -> str:
    parts = path.relative_to(LIBRARY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(path: Path) -> bool:
    return path.with_suffix(".py").is_file() or path.is_dir()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported layertime module, names taken from it) for every import in the file, functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "layertime":
            package = node.module.removeprefix("layertime").removeprefix(".")
            folder = LIBRARY.joinpath(*package.split(".")) if package else LIBRARY
            # `from layertime import bridge` and `from layertime.report import figures` import modules
            modules = [a.name for a in node.names if _is_module(folder / a.name)]
            names = [a.name for a in node.names if a.name not in modules]
            found += [(f"{package}.{m}" if package else m, []) for m in modules]
            if package and names:
                found.append((package, names))
        elif isinstance(node, ast.Import):
            found += [
                (a.name.removeprefix("layertime."), []) for a in node.names if a.name.startswith("layertime.")
            ]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in LIBRARY.rglob("*.py")}
    return {
        name: {m for m, _ in _imports(path) if m in modules and m != name} for name, path in modules.items()
    }


def _cycle_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges whose two ends reach each other: the edges inside the graph's strongly connected parts."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    return {(a, b) for a, targets in graph.items() for b in targets if a in reachable[b]}


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{_module(path)} imports {module}.{name}"
        for path in LIBRARY.rglob("*.py")
        for module, names in _imports(path)
        for name in names
        if name.startswith("_") and module != "__future__"
    ]
    assert private == [], "make it public where it belongs, or give it a small module of its own"


def test_no_import_cycle_in_the_library():
    cycles = sorted(_cycle_edges(_graph()))
    assert cycles == [], f"import cycle edges (importer, imported): {cycles}"


def test_the_cycle_finder_finds_a_cycle_and_only_its_edges():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycle_edges(graph) == {("a", "b"), ("b", "c"), ("c", "a")}


def test_a_submodule_imported_from_its_package_is_an_edge_to_the_submodule():
    edges = _graph()["hub.verify"]
    assert {"hub.cache", "hub.prefetch"} <= edges  # `from layertime.hub import cache, prefetch`
    assert "hub" not in edges

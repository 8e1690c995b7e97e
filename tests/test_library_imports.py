"""`layertime/` is the library: no module of it, in any sub-package, imports Prefect or Dask when it is
imported (issue 16). Read from the source, so a module added later is covered without being listed
(tests/test_library.py imports a list of modules and looks at sys.modules). An import inside a
function is allowed: it runs only when that function is called, as the CLI's `run` does."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "layertime"
ORCHESTRATION = {"prefect", "prefect_dask", "dask", "distributed", "dask_jobqueue"}


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, top-level module) of each import run at import time: the module's body, including
    under `if`/`try`/`with` blocks, but not inside functions or classes' methods."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.ClassDef):
            todo += [n for n in node.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return found


def test_no_module_of_the_library_imports_prefect_or_dask_at_import_time():
    modules = sorted(LIBRARY.rglob("*.py"))
    assert len(modules) > 20  # the walk sees the library, sub-packages included
    bad = [
        f"{path.relative_to(LIBRARY.parent)}:{line}: import {name}"
        for path in modules
        for line, name in _module_level_imports(ast.parse(path.read_text()))
        if name in ORCHESTRATION
    ]
    assert not bad, bad


def test_the_walk_finds_an_import_under_if_and_try_but_not_in_a_function():
    tree = ast.parse(
        "import os\nif True:\n    import prefect\ntry:\n    from dask import array\nexcept ImportError:\n    pass\n"
        "def f():\n    import distributed\nclass C:\n    import prefect_dask\n    def m(self):\n        import dask_jobqueue\n"
    )
    assert sorted(name for _, name in _module_level_imports(tree)) == [
        "dask",
        "os",
        "prefect",
        "prefect_dask",
    ]


ORCHESTRATION_FOLDERS = {"flows", "tasks"}  # the repository's Prefect layers, over the library


def _names_of_the_orchestration(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) of each import of flows/ or tasks/, anywhere in the module (functions included: an
    import at call time is still an edge), and each string in code naming flows/ (a path to it);
    docstrings and comments may mention them."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name.split(".")[0] in ORCHESTRATION_FOLDERS
            ]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ORCHESTRATION_FOLDERS
        ):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if "flows" in node.value.replace("\\", "/").split("/"):
                found.append((node.lineno, repr(node.value)))
    return found


def test_the_library_never_imports_or_names_flows_or_tasks():
    """The library is the bottom layer: tasks/ and flows/ import it, never the other way (the `layertime`
    console script, which may import both, is layertime_command.py beside them)."""
    bad = [
        f"{path.relative_to(LIBRARY.parent)}:{line}: {what}"
        for path in sorted(LIBRARY.rglob("*.py"))
        for line, what in _names_of_the_orchestration(ast.parse(path.read_text()))
    ]
    assert not bad, bad


def test_the_orchestration_finder_sees_imports_in_functions_and_paths_but_not_docstrings():
    tree = ast.parse(
        '"""Imports flows/ and tasks/ nowhere."""\nimport os\ndef f():\n    """Names flows/ in words."""\n'
        '    from flows.commands import app\n    import tasks.units\n    return "flows/commands.py", "tasks"\n'
    )
    assert [what for _, what in _names_of_the_orchestration(tree)] == [
        "from flows.commands import ...",
        "import tasks.units",
        "'flows/commands.py'",
    ]

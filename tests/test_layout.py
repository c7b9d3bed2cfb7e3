"""The import layout of lafs_jax, read from the source with `ast` (nothing is imported, no jax).

Imports run downward (lafs_jax/INTERFACES.md, "Layers"): no cycle between modules or between
packages, no lafs_jax import hidden inside a function or class body, nothing under lafs_jax imports the
repo-root folders (`data/`, `bench/`, `configs/`, `tests/`), and no test imports `bench/`.
"""
from __future__ import annotations

import ast
import graphlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lafs_jax"
REPO_FOLDERS = ("data", "bench", "configs", "tests")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _sources(folder: str) -> dict[str, str]:
    """{dotted module name: file path} of every .py file under ROOT/folder."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out[_module_name(path)] = path
    return out


MODULES = _sources(PACKAGE)


def _imports(module: str, path: str) -> list[tuple[str, int, bool]]:
    """(imported dotted name, line, at module level) of every import statement of `path`; relative
    imports resolved; `from a import b` gives 'a.b' when that is a module, else 'a'."""
    tree = ast.parse(open(path).read(), filename=path)
    is_package = path.endswith("__init__.py")
    out = []

    def visit(node, top_level: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, top_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".")
                    parts = parts if is_package else parts[:-1]
                    parts = parts[:len(parts) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for a in child.names:
                    full = f"{base}.{a.name}"
                    out.append((full if full in MODULES else base, child.lineno, top_level))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(child, False)
            else:
                visit(child, top_level)

    visit(tree, True)
    return out


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _ours(name: str) -> str | None:
    """The lafs_jax module `name` refers to (itself or the package that holds it), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name.startswith(PACKAGE + ".") else None


def _package(module: str) -> str:
    """'lafs_jax.train' for lafs_jax.train.finetune; a top-level module (lafs_jax.config) is its own."""
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def test_the_parser_sees_the_package():
    assert {"lafs_jax.sharding", "lafs_jax.variables", "lafs_jax.train.finetune", "lafs_jax.eval.embed"} <= set(MODULES)
    assert ("lafs_jax.sharding", True) in {(_ours(n), top) for n, _, top in IMPORTS["lafs_jax.train.finetune"]}


def test_no_import_cycle_between_modules():
    graph = {m: {t for n, _, _ in imports if (t := _ours(n)) and t != m} for m, imports in IMPORTS.items()}
    assert _cycle(graph) is None, f"module import cycle: {' -> '.join(_cycle(graph))}"


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for m, imports in IMPORTS.items():
        deps = graph.setdefault(_package(m), set())
        deps.update(p for n, _, _ in imports if (t := _ours(n)) and (p := _package(t)) != _package(m))
    assert _cycle(graph) is None, f"package import cycle: {' -> '.join(_cycle(graph))}"


def test_no_lafs_jax_import_inside_a_function():
    hidden = [f"{os.path.relpath(MODULES[m], ROOT)}:{line} imports {n}" for m, imports in IMPORTS.items()
              for n, line, top in imports if not top and (n == PACKAGE or n.startswith(PACKAGE + "."))]
    assert not hidden, "imports of lafs_jax must be at module top:\n" + "\n".join(hidden)


def test_the_floor_imports_nothing_of_lafs_jax():
    """config and sharding import nothing of lafs_jax; variables only sharding (parameter paths)."""
    allowed = {"lafs_jax.config": set(), "lafs_jax.sharding": set(), "lafs_jax.variables": {"lafs_jax.sharding"}}
    for m, ok in allowed.items():
        assert not [n for n, _, _ in IMPORTS[m] if _ours(n) and n not in ok], m


def test_the_package_does_not_import_repo_folders():
    bad = [f"{os.path.relpath(MODULES[m], ROOT)}:{line} imports {n}" for m, imports in IMPORTS.items()
           for n, line, _ in imports if n.split(".")[0] in REPO_FOLDERS]
    assert not bad, "lafs_jax must work as a package on its own:\n" + "\n".join(bad)


def test_no_test_imports_bench():
    bad = [f"{os.path.relpath(p, ROOT)}:{line} imports {n}" for m, p in _sources("tests").items()
           for n, line, _ in _imports(m, p) if n.split(".")[0] == "bench"]
    assert not bad, "\n".join(bad)


def test_no_import_by_name_inside_the_package():
    """importlib.import_module / __import__ with a module name would hide an edge from the graph above."""
    bad = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path).read(), filename=path)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__"):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not bad, "imports by name under lafs_jax:\n" + "\n".join(bad)


def test_methods_never_import_the_tasks():
    """A method is hooks on the shared tasks: it may import models/, losses/, input/ and the floor,
    never train/ or eval/ (which call the hooks)."""
    bad = [f"{os.path.relpath(MODULES[m], ROOT)}:{line} imports {n}" for m, imports in IMPORTS.items()
           if m.startswith(PACKAGE + ".methods") for n, line, _ in imports
           if (t := _ours(n)) and _package(t) in (PACKAGE + ".train", PACKAGE + ".eval")]
    assert not bad, "\n".join(bad)
METHOD_WORDS = re.compile(r"\b(curriculum|landmark|dino|lvface|prototype)", re.IGNORECASE)
MAX_METHOD_LINES_IN_TRAIN = 10
MAX_LINES = 600


def test_the_shared_tasks_do_not_name_methods():
    """train/ is shared by every method: lines naming one (code, comments, config keys) stay few."""
    hits = []
    for m, path in MODULES.items():
        if m.startswith(PACKAGE + ".train"):
            hits += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                     for i, line in enumerate(open(path), 1) if METHOD_WORDS.search(line)]
    assert len(hits) <= MAX_METHOD_LINES_IN_TRAIN, f"{len(hits)} lines name a method:\n" + "\n".join(hits)


def test_no_module_is_longer_than_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in MODULES.values() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"

"""The testbed's modules import each other one way only: the import graph (every import statement, those inside
functions included) is acyclic, and every module imports on its own."""
from __future__ import annotations

import ast
import graphlib
import importlib
from pathlib import Path

import pytest

import hat.testbed

PACKAGE = "hat.testbed"
FOLDER = Path(hat.testbed.__file__).parent


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module stem -> the stems of the same package it imports (relative or absolute, anywhere in the file)."""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.module == package:  # from hat.testbed import x
                    targets = [a.name for a in node.names]
                elif node.module and node.module.startswith(package + "."):
                    targets = [node.module[len(package) + 1:]]
                else:
                    targets = []
            elif isinstance(node, ast.Import):
                targets = [a.name[len(package) + 1:] for a in node.names if a.name.startswith(package + ".")]
            else:
                continue
            found.update(t.split(".")[0] for t in targets if t.split(".")[0] in modules)
        graph[name] = found - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("import os\n\ndef f():\n    from hat.pkg.c import y\n")
    (tmp_path / "c.py").write_text("from hat.pkg import a\n")
    (tmp_path / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path, "hat.pkg")
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"c"}}
    assert set(cycle(graph)) == {"a", "b", "c"}
    (tmp_path / "c.py").write_text("")
    assert cycle(import_graph(tmp_path, "hat.pkg")) is None


def test_the_testbed_import_graph_is_acyclic():
    graph = import_graph(FOLDER, PACKAGE)
    assert {"experiment", "cloud_only", "scenario", "sim_hardware"} <= set(graph)
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


@pytest.mark.parametrize("name", sorted(p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__"))
def test_every_testbed_module_imports(name):
    assert importlib.import_module(f"{PACKAGE}.{name}").__name__ == f"{PACKAGE}.{name}"

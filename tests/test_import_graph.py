"""One home for shared constants, and no import cycle in the library (function-level
imports included: a cycle there only hides until the function runs first)."""

from __future__ import annotations

import ast
from pathlib import Path

import reprotune
from reprotune.constants import IGNORE_INDEX

SRC = Path(reprotune.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports anywhere in its file."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module not in modules:
                    continue
                # `from reprotune.train import speed` imports the submodule speed
                subs = {f"{node.module}.{a.name}" for a in node.names}
                hit = subs & set(modules)
                deps |= hit or {node.module}
                if hit != subs:
                    deps.add(node.module)
        # importing a package's submodule runs the package's __init__ (empty here) first
        graph[name] = {d for d in deps if d != name and d != "reprotune"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_sees_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_train_package_has_no_import_cycle():
    graph = import_graph()
    # the edges that used to close a cycle: lean_loss -> training -> (function level) lean_loss
    assert "reprotune.train.training" not in graph["reprotune.train.lean_loss"]
    assert "reprotune.train.training" not in graph["reprotune.train.speed"]
    train = {k: {d for d in v if d.startswith("reprotune.train")}
             for k, v in graph.items() if k.startswith("reprotune.train")}
    assert find_cycle(train) is None, find_cycle(train)


def test_ignore_index_has_one_definition():
    assert IGNORE_INDEX == -100
    defining = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                      if any(isinstance(n, ast.Assign) and any(
                          isinstance(t, ast.Name) and t.id == "IGNORE_INDEX" for t in n.targets)
                          for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))))
    assert defining == ["constants.py"]
    graph = import_graph()
    for user in ("reprotune.data.rendering", "reprotune.train.data", "reprotune.train.lean_loss",
                 "reprotune.train.packing", "reprotune.train.training"):
        assert "reprotune.constants" in graph[user], user
    assert graph["reprotune.constants"] == set()  # importable from anywhere

"""The library has no import cycles, counting imports inside functions as well.

A function-level import hides a cycle from Python at import time but not from the reader:
two modules that each need the other are one concept split in two, and the next module-level
import between them fails with a half-initialised module. The graph is built with ``ast``
over every file of ``src/reprotune`` (no module is imported); an edge goes from a module to
each ``reprotune`` module it names, wherever in the file the import statement sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "reprotune"


def _module_name(path: Path, pkg: Path) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported(path: Path, pkg: Path, modules: set[str]) -> set[str]:
    """The ``reprotune`` modules ``path`` imports, at module level or inside functions.

    ``from reprotune.data import hub`` names the module ``reprotune.data.hub``;
    ``from reprotune.data.readers import RawRow`` names ``reprotune.data.readers``. Parent
    packages run on the way are not edges: ``hub.manifest`` importing ``readers`` does not make
    ``readers`` depend on ``hub``.
    """
    this = _module_name(path, pkg)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "reprotune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "reprotune":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    out.discard(this)
    return {m for m in out if m in modules}


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (module- and function-level)."""
    files = sorted(pkg.rglob("*.py"))
    modules = {_module_name(f, pkg) for f in files}
    return {_module_name(f, pkg): _imported(f, pkg, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a
    sorted list; the list is sorted too, so a failure reads the same on every run."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert len(graph) >= 60, len(graph)  # every file of the package was parsed
    # module level: runtime validates params.yaml on start-up
    assert "reprotune.params" in graph["reprotune.runtime"]
    # function level (inside the hub reader): the snapshot's files go through the file readers
    assert "reprotune.data.readers" in graph["reprotune.data.hub"]
    # `from reprotune.data import hub` names the subpackage, not reprotune.data
    assert "reprotune.data.hub" in graph["reprotune.data.inputs"]


def test_cycle_finder_finds_a_function_level_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "reprotune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from reprotune.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from reprotune.a import x\n")
    (pkg / "c.py").write_text("from reprotune import a\n")
    assert cycles(import_graph(pkg)) == [["reprotune.a", "reprotune.sub.b"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles (module- or function-level): " + "; ".join(
        " <-> ".join(c) for c in found)

"""dvc.yaml lists, for every stage, exactly the library modules its entry point imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reprotune.params import SECTIONS, TOP_KEYS, read_params

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "reprotune"
# Data files a module reads at run time, which are deps wherever the module is.
DATA_DEPS = {"chat_template": ["src/reprotune/templates/qwen3_chat_template.jinja"],
             "markup": ["src/reprotune/templates/qwen3_added_tokens.json"]}


def _module_file(dotted: str) -> Path | None:
    """src file of a ``reprotune...`` module or package (None for a name that is neither)."""
    rel = Path(*dotted.split(".")[1:])
    for cand in (PKG / rel.with_suffix(".py"), PKG / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[Path]:
    """Files of the reprotune modules imported (anywhere in the file, incl. inside
    functions) by ``path``, with the ``__init__.py`` of every package on the way."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("reprotune."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reprotune"):
            for a in node.names:  # `from reprotune.data import ingest`: a module, not a name
                sub = f"{node.module}.{a.name}"
                names.add(sub if _module_file(sub) else node.module)
    found: set[Path] = set()
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # reprotune.data.ingest -> data/__init__, data/ingest
            f = _module_file(".".join(parts[:i]))
            if f is not None:
                found.add(f)
    return found


def _closure(stage_file: Path) -> set[Path]:
    todo, seen = list(_imports(stage_file)), set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f))
    return seen


def _stages() -> dict:
    """Stage definitions; a ``foreach`` stage is represented by its ``do`` template."""
    raw = YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: st.get("do", st) for name, st in raw.items()}


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_are_exactly_its_imports(name: str) -> None:
    stage = _stages()[name]
    script = re.search(r"stages/(\w+)\.py", stage["cmd"]).group(0)
    files = _closure(ROOT / script)
    expected = {script, "src/reprotune/__init__.py"} | {
        f.relative_to(ROOT).as_posix() for f in files}
    for f in files:
        expected.update(DATA_DEPS.get(f.stem, []))
    declared = {d for d in stage["deps"] if d.startswith(("src/", "stages/"))}
    assert declared == expected, (f"{name}: missing {sorted(expected - declared)}, "
                                  f"extra {sorted(declared - expected)}")


def test_read_stages_depend_on_exactly_their_input() -> None:
    """One read stage per ingest.inputs entry, each on exactly its file (no data/raw folder)."""
    raw = YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"]
    assert raw["read"]["foreach"] == "${ingest.inputs}"
    deps = raw["read"]["do"]["deps"]
    assert "${item}" in deps and not any(d.startswith("data/") for d in deps)
    assert not any(d.startswith("data/raw") for st in _stages().values() for d in st["deps"])
    assert _stages()["ingest"]["deps"][0] == "data/interim/read"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_params_cover_the_sections_it_loads(name: str) -> None:
    stage = _stages()[name]
    script = re.search(r"stages/(\w+)\.py", stage["cmd"]).group(0)
    src = (ROOT / script).read_text(encoding="utf-8")
    loaded = set(re.findall(r"load_section\(\s*[\"'](\w+)[\"']", src))
    params = stage.get("params", [])
    if {"params.yaml": None} in params:  # the whole file (the check stage)
        assert params == [{"params.yaml": None}], f"{name}: whole file plus single keys"
        return
    declared = {p.split(".")[0] for p in params}
    assert loaded <= declared, f"{name} loads {sorted(loaded - declared)} without declaring them"
    if "load_top(" in src:
        assert declared & set(TOP_KEYS), f"{name} reads top-level knobs but declares none"
    raw = read_params(ROOT / "params.yaml")
    for p in stage.get("params", []):  # every declared key exists
        node = raw
        for part in p.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: params key {p} not in params.yaml"
            node = node[part]
    assert set(SECTIONS) | set(TOP_KEYS) >= {p.split(".")[0] for p in stage.get("params", [])}


def test_check_stage_is_upstream_of_every_other_stage() -> None:
    """A params.yaml mistake must stop `dvc repro` before any stage deletes its outputs."""
    stages = _stages()
    check_out = next(iter(stages["check"]["outs"][0]))
    roots = [n for n, s in stages.items() if n != "check" and check_out in s["deps"]]
    assert roots == ["demo", "read", "review_wins"]
    produced = {out if isinstance(out, str) else next(iter(out)): n
                for n, s in stages.items() for out in s.get("outs", [])}

    def feeds(out: str, dep: str) -> bool:  # a file dep, or a folder holding an output
        return out == dep or out.startswith(dep + "/") or dep.startswith(out + "/")

    def upstream(n: str) -> set[str]:
        ups = {p for d in stages[n]["deps"] for o, p in produced.items() if feeds(o, d)}
        return ups | {u2 for u in ups for u2 in upstream(u)}

    for n in stages:
        if n != "check":
            assert "check" in upstream(n), f"{n} does not run after the check stage"

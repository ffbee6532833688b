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


# pipeline files besides dvc.yaml (their stages' paths are relative to the root, wdir ../..)
SUB_PIPELINES = ("data/raw/dvc.yaml",)


def _stages() -> dict:
    """Stage definitions of every pipeline file; a ``foreach`` stage is represented by its
    ``do`` template."""
    raw = dict(YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"])
    for sub in SUB_PIPELINES:
        raw.update(YAML(typ="safe", pure=True).load((ROOT / sub).read_text())["stages"])
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
    first = stages["check"]["outs"][0]
    check_out = first if isinstance(first, str) else next(iter(first))
    roots = [n for n, s in stages.items() if n != "check" and check_out in s["deps"]]
    assert sorted(roots) == ["demo", "read", "review_wins"]
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


@pytest.mark.parametrize("inputs, demo_runs", [
    ("[data/raw/demo.jsonl]", True),
    ("[data/raw/mine.jsonl]", False),
])
def test_demo_stage_runs_only_when_an_input_names_its_file(tmp_path: Path, inputs: str,
                                                           demo_runs: bool) -> None:
    """`dvc repro` (what DVC would run, --dry) includes the demo stage only while
    ingest.inputs names data/raw/demo.jsonl."""
    import os
    import shutil
    import subprocess
    import sys

    for rel in ("dvc.yaml", *SUB_PIPELINES, "params.yaml", "stages", "src", "configs",
                "data/reference"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace(
        "  inputs:             # files to read: .json .jsonl .csv .parquet; put your own here\n"
        "  - data/raw/demo.jsonl\n", f"  inputs: {inputs}\n"))
    assert f"inputs: {inputs}" in params.read_text()
    (tmp_path / "data" / "raw" / "mine.jsonl").write_text(
        '{"instruction": "一加一等于几？", "output": "二。"}\n')
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True, env=env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    subprocess.run([dvc, "repro", "-q", "check"], cwd=tmp_path, check=True, env=env, timeout=300)
    # a dry run stops at the first stage whose inputs do not exist yet: demo (its output
    # feeds the read stage) when it is planned, else the read stage of the user's file
    out = subprocess.run([dvc, "repro", "--dry"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    ran = set(re.findall(r"Running stage '([^']+)'", out.stdout))
    assert ("data/raw/dvc.yaml:demo" in ran) is demo_runs, out.stdout + out.stderr
    if not demo_runs:
        assert "read@data/raw/mine.jsonl" in ran, out.stdout + out.stderr
    # and plain `dvc repro` plans its targets from dvc.yaml alone, where demo is not
    top = YAML(typ="safe", pure=True).load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "demo" not in top

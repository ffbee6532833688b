"""Lineage: the run-info file in a model folder, and `make lineage` on a real git + DVC repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from reprotune import io
from reprotune.lineage import LINEAGE_FILE, run_info, tree_md5, upstream_stages, versions

MAKE_MODEL = """import pathlib
from reprotune.lineage import run_info, write_run_info
d = pathlib.Path("models/m")
d.mkdir(parents=True, exist_ok=True)
(d / "w.bin").write_text(open("data/b.txt").read() * 2)
write_run_info(d, run_info("model", {"top": {"lr": 0.1}, "stray_key": False},
                           ["data/b.txt", "data/parts"], "cpu"))
"""
PREP = ("import pathlib; t = open('data/raw/a.txt').read().upper(); "
        "open('data/b.txt', 'w').write(t); p = pathlib.Path('data/parts'); p.mkdir(); "
        "(p / 'one.txt').write_text(t[:2])")
DVC_YAML = f"""stages:
  prep:
    cmd: python -c "{PREP}"
    params: [prep.upper]
    deps: [data/raw/a.txt]
    outs: [data/b.txt, data/parts]
  model:
    cmd: python make_model.py
    params: [lr, lora]
    deps: [data/b.txt, data/parts, make_model.py, settings.txt]
    outs: [models/m]
"""
PARAMS = "prep:\n  upper: true\nlr: 0.1\nlora:\n  r: 4\n"


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_tree_md5_is_content_only_and_skips_the_lineage_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "x.txt").write_text("x")
        (d / "sub" / "y.txt").write_text("y")
    (a / LINEAGE_FILE).write_text("{}")
    assert tree_md5(a) == tree_md5(b)
    (b / "sub" / "y.txt").write_text("z")
    assert tree_md5(a) != tree_md5(b)
    assert tree_md5(a / "x.txt") == "9dd4e461268c8034f5c8564e155c67a6"  # md5 of "x"


def test_run_info_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("data")
    one = run_info("train", {"lr": 1e-3}, [tmp_path / "d.txt"], "cuda:0")
    assert one == run_info("train", {"lr": 1e-3}, [tmp_path / "d.txt"], "cuda:0")
    assert one["device"] == "cuda" and one["versions"]["torch"] == versions()["torch"]
    assert "+" not in one["versions"]["torch"]  # 2.13.0, not 2.13.0+cpu
    assert set(one) == {"stage", "params", "inputs", "versions", "device"}  # no time, no commit


def test_upstream_stages_walks_dvc_lock_nearest_first() -> None:
    stages = {
        "a": {"deps": [{"path": "raw.txt", "md5": "1"}, {"path": "src/x.py", "md5": "c"}],
              "outs": [{"path": "parts/a", "md5": "2"}]},
        "z": {"deps": [{"path": "raw.txt", "md5": "1"}], "outs": [{"path": "parts/z", "md5": "5"}]},
        "b": {"deps": [{"path": "parts", "md5": "6.dir"}, {"path": "cfg.txt", "md5": "3"}],
              "outs": [{"path": "out", "md5": "4"}]},
        "c": {"deps": [{"path": "out", "md5": "4"}], "outs": [{"path": "final", "md5": "7"}]},
        "other": {"deps": [{"path": "raw.txt", "md5": "1"}], "outs": [{"path": "x", "md5": "8"}]},
    }
    # `parts` is a folder holding the outputs of a and z; `other` is not upstream of final
    assert upstream_stages(stages, "c") == ["c", "b", "a", "z"]


def test_make_lineage_on_a_real_repo(tmp_path: Path, repo_root: Path) -> None:
    root = tmp_path / "repo"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "a.txt").write_text("hello")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    (root / "make_model.py").write_text(MAKE_MODEL)
    (root / "settings.txt").write_text("kept in git\n")
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/a.txt"], root)
    _run([sys.executable, "-m", "dvc", "repro", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "first model"], root)
    info = io.read_json(root / "models" / "m" / LINEAGE_FILE)
    assert info["inputs"] == {"data/b.txt": tree_md5(root / "data" / "b.txt"),
                              "data/parts": tree_md5(root / "data" / "parts")}
    lock = YAML(typ="safe", pure=True).load((root / "dvc.lock").read_text())["stages"]
    dvc_md5 = {d["path"]: d["md5"] for d in lock["model"]["deps"]}
    assert dvc_md5["data/parts"].endswith(".dir") and dvc_md5["data/parts"] != info["inputs"][
        "data/parts"] + ".dir"  # DVC's directory hash is not the content md5

    out = _run([sys.executable, "-m", "reprotune.lineage", "models/m"], root)
    lines = out.splitlines()
    assert lines[0] == f"models/m: written by stage `model`; dvc.lock md5 {lock['model']['outs'][0]['md5']}"
    assert lines[1].startswith("  recorded in git commit: ") and lines[1].endswith("first model")
    assert "device: cpu" not in out and "the run (reprotune_lineage.json): device cpu;" in out
    assert "  CPU kernels: ATen " in out and "MKL_CBWR=COMPATIBLE" in out  # the pinned family
    assert "stray_key" not in out  # only params.yaml keys, as dvc.lock recorded them
    stage_lines = [ln for ln in lines if ln.startswith("  ") and not ln.startswith("   ")]
    assert [ln.split(":")[0].strip() for ln in stage_lines[-3:-1]] == ["model", "prep"]
    assert "  model: lr=0.1" in lines and "      recorded but unused by this run: lora" in lines
    assert "  prep: prep.upper=true" in lines
    # every input with its dvc.lock hash and where it comes from; both hashes of the folder
    assert f"      <- data/b.txt {dvc_md5['data/b.txt']} (from stage `prep`)" in lines
    assert f"      <- data/parts {dvc_md5['data/parts']} (from stage `prep`)" in lines
    assert f"         content md5 in the run record: {info['inputs']['data/parts']}" in lines
    assert f"      <- settings.txt {dvc_md5['settings.txt']} (in git)" in lines
    raw_md5 = lock["prep"]["deps"][0]["md5"]
    assert f"      <- data/raw/a.txt {raw_md5} (raw input, tracked by data/raw/a.txt.dvc)" in lines
    assert "DVC's directory hash" in out and "content md5" in out
    assert len(lines) <= 25 and max(map(len, lines)) <= 110, out  # one screen
    proc = subprocess.run([sys.executable, "-m", "reprotune.lineage", "data/raw/a.txt"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "make lineage: data/raw/a.txt: no stage in dvc.lock writes it")


def test_a_cpu_run_records_its_kernel_family_and_nothing_machine_specific(
        tmp_path: Path, monkeypatch) -> None:
    """Under the portable pin the record is the same on every x86-64 machine (the model
    folder's hash with it); with native kernels it names the CPU its numbers hold on."""
    import torch

    from reprotune import PORTABLE_ENV
    from reprotune.cpu_kernels import describe, machine, machine_name

    (tmp_path / "d.txt").write_text("data")
    for key, value in PORTABLE_ENV.items():
        monkeypatch.setenv(key, value)
    info = run_info("train", {}, [tmp_path / "d.txt"], "cpu")
    assert info["cpu_kernels"] == {"aten_isa": torch.backends.cpu.get_cpu_capability(),
                                   "mkl_cbwr": "COMPATIBLE", "onednn_max_cpu_isa": None,
                                   "portable": True}
    assert describe(info["cpu_kernels"]) == (
        f"ATen {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR=COMPATIBLE "
        "(portable: same numbers on Intel and AMD)")
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    native = run_info("train", {}, [tmp_path / "d.txt"], "cpu")["cpu_kernels"]
    assert native["portable"] is False and native["cpu"] == machine_name() != ""
    assert f"native: numbers hold on {machine_name()} only" in describe(native)
    assert "cpu_kernels" not in run_info("train", {}, [tmp_path / "d.txt"], "cuda:0")
    # where it ran goes to the untracked timing files
    assert machine()["torch_threads"] == torch.get_num_threads()

"""`make verify` / the model stages' first step rehash outputs against dvc.lock with DVC's own
hashes, so a flipped bit with its mtime put back (which `dvc status` misses) is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import verify

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
MAKE = ("mkdir -p models/m/sub && python -c \"import os; open('models/m/w.bin','wb')"
        ".write(os.urandom(200000))\" && printf 'a\\r\\nb' > models/m/crlf.txt && "
        "echo '{}' > models/m/config.json && echo x > models/m/sub/t.txt")


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def _flip_bit_keep_mtime(path: Path, offset: int = 1000) -> None:
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A real DVC project whose stage `make` wrote the folder models/m and the file one.txt."""
    env = _env()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  make:\n    cmd: {json.dumps(MAKE)}\n    outs:\n      - models/m\n"
        "  one:\n    cmd: echo hello > one.txt\n    outs:\n      - one.txt\n")
    subprocess.run([DVC, "repro", "-q"], cwd=tmp_path, check=True, env=env, timeout=300)
    return tmp_path


def _verify_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reprotune.verify", *args], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_dvc_hashes_match_and_a_flipped_bit_is_caught(project: Path) -> None:
    # our md5 of the folder listing is DVC's own (nested file, CRLF text kept as bytes)
    assert verify.verify_paths(["models/m", "one.txt"], root=project) == ["models/m", "one.txt"]
    proc = _verify_cli(project)
    assert proc.returncode == 0 and proc.stdout == "models/m: matches dvc.lock (stage make)\n"

    _flip_bit_keep_mtime(project / "models" / "m" / "w.bin")
    status = subprocess.run([DVC, "status"], cwd=project, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert "up to date" in status.stdout  # DVC itself trusts the restored mtime
    proc = _verify_cli(project)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "verify: models/m: w.bin differs from what stage `make` wrote (dvc.lock); its files "
        "were changed or corrupted since (`dvc status` trusts sizes and times, so it misses "
        "this). Restore them: dvc checkout --relink --force models/m (or rebuild: dvc repro -f "
        "make; or, if you changed them on purpose: dvc commit make)"]

    # the named fix works
    subprocess.run([DVC, "checkout", "-q", "--relink", "--force", "models/m"], cwd=project,
                   env=_env(), check=True, timeout=120)
    assert _verify_cli(project).returncode == 0

    # missing and extra files are named too; an interrupted-write temporary is not a file
    (project / "models" / "m" / "sub" / "t.txt").unlink()
    (project / "models" / "m" / "extra.bin").write_bytes(b"x")
    (project / "models" / "m" / ".w.bin.1234.tmp").write_bytes(b"x")
    with pytest.raises(verify.IntegrityError, match=r"^models/m: \+extra\.bin, -sub/t\.txt differ "):
        verify.verify_paths(["models/m"], root=project)

    (project / "one.txt").rename(project / "two.txt")
    with pytest.raises(verify.IntegrityError, match=r"^one\.txt: missing \(stage `one` writes it\); "
                       r"restore it: dvc checkout one\.txt \(or dvc pull one\.txt, or rebuild: "
                       r"dvc repro one\)$"):
        verify.verify_paths(["one.txt"], root=project)
    (project / "two.txt").rename(project / "one.txt")
    _flip_bit_keep_mtime(project / "one.txt", 0)
    with pytest.raises(verify.IntegrityError, match=r"^one\.txt: file differs from what stage `one`"):
        verify.verify_paths(["one.txt"], root=project)


def test_listing_md5_is_dvcs_dir_hash() -> None:
    # the .dir hash dvc_data computes for the same listing
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    listing = [{"md5": "0" * 32, "relpath": "b/z.txt"}, {"md5": "1" * 32, "relpath": "a.bin"}]
    tree = Tree()
    for e in listing:
        tree.add(tuple(e["relpath"].split("/")), Meta(), HashInfo("md5", e["md5"]))
    tree.digest()
    assert verify.listing_md5(sorted(listing, key=lambda e: e["relpath"])) == tree.hash_info.value


def _fake_project(tmp_path: Path, folder: str, stage: str) -> Path:
    model = tmp_path / folder
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    md5 = verify.listing_md5(verify.folder_listing(model))
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  {stage}:\n    cmd: x\n    outs:\n    - path: {folder}\n"
        f"      hash: md5\n      md5: {md5}\n      nfiles: 2\n")
    _flip_bit_keep_mtime(model / "model.safetensors", 10)
    return tmp_path


@pytest.mark.parametrize("script, args, folder, stage", [
    ("merge", ["--finetuned", "models/finetuned"], "models/finetuned", "train"),
    ("quantize", ["--merged", "models/merged"], "models/merged", "merge"),
    ("evaluate", ["--kind", "finetuned", "--model", "models/finetuned"], "models/finetuned",
     "train"),
])
def test_model_stages_stop_on_a_changed_input(tmp_path: Path, script: str, args: list[str],
                                              folder: str, stage: str) -> None:
    project = _fake_project(tmp_path, folder, stage)
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{script}.py"), *args],
                          cwd=project, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: {folder}: 2 files hash to ")  # no DVC cache to name them
    assert f"dvc checkout --relink --force {folder}" in last and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # nothing written


@pytest.mark.slow
def test_make_repro_first_step_stops_only_on_what_dvc_cannot_see(project: Path) -> None:
    """`make repro` runs `python -m reprotune.verify --before-repro` before `dvc repro`: a
    flipped bit with its mtime kept stops it in one line; a folder DVC sees changed (or
    missing) is left to dvc repro, which rebuilds it."""
    proc = _verify_cli(project, "--before-repro")
    assert proc.returncode == 0 and proc.stdout == "verify: 1 model folders match dvc.lock\n"
    weights = project / "models" / "m" / "w.bin"
    _flip_bit_keep_mtime(weights)
    proc = _verify_cli(project, "--before-repro")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("verify: models/m: w.bin differs from what stage `make` wrote")
    os.utime(weights)  # now DVC sees the change: dvc repro reruns `make`, nothing to stop
    left = "verify: 0 model folders match dvc.lock; 1 missing or changed, which dvc repro rebuilds\n"
    assert _verify_cli(project, "--before-repro").stdout == left
    subprocess.run(["rm", "-rf", str(project / "models" / "m")], check=True)
    assert _verify_cli(project, "--before-repro").stdout == left  # missing: rebuilt too


def test_make_repro_checks_params_and_model_folders_before_dvc(repo_root: Path) -> None:
    recipe = (repo_root / "Makefile").read_text().split("\nrepro: install\n", 1)[1]
    steps = [line.strip().lstrip("@") for line in recipe.split("\n\n", 1)[0].splitlines()]
    assert steps == ["$(BIN)/python -m reprotune.params",
                     "$(BIN)/python -m reprotune.verify --before-repro", "$(BIN)/dvc repro"]


def test_a_corrupt_align_pointer_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/aligned of align.method none is a pointer file: a byte changed in it (mtime
    kept) stops evaluate at its verify step naming models/aligned, not models/finetuned; a
    pointer dvc.lock does not know yet that is not JSON stops merge in one line."""
    aligned = tmp_path / "models" / "aligned"
    aligned.mkdir(parents=True)
    pointer = aligned / "reprotune_align.json"
    pointer.write_text('{"method": "none", "model": "models/finetuned", "sft_method": "lora"}')
    md5 = verify.listing_md5(verify.folder_listing(aligned))
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  align:\n    cmd: x\n    outs:\n    - path: models/aligned\n"
        f"      hash: md5\n      md5: {md5}\n      nfiles: 1\n")
    _flip_bit_keep_mtime(pointer, 45)  # "models/finetuned" -> "models/finetunec"
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "--kind",
                           "finetuned", "--model", "models/aligned"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "evaluate: models/aligned: 1 files hash to ")
    (tmp_path / "dvc.lock").unlink()
    pointer.write_bytes(b'{"method": "none", "model": "models/fine\xff')
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "merge.py"), "--finetuned",
                           "models/aligned"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("merge: models/aligned/reprotune_align.json: corrupt, not the align "
                           "stage's record (")
    assert last.endswith("restore it: dvc checkout models/aligned (or rerun align: dvc repro "
                         "-f align)")
    from reprotune.train.loading import FinetunedLoadError, resolve_model_dir

    pointer.write_text('{"method": "none", "model": "models/finetuned"}')
    monkeypatch.chdir(tmp_path)  # the pointer's path is relative: not the checkout's own models/
    with pytest.raises(FinetunedLoadError, match="names 'models/finetuned', which holds no "
                                                 "fine-tuned model .* run the train stage"):
        resolve_model_dir(aligned)

"""lock/*.txt pins every dependency in pyproject.toml, with hashes, and shares its pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}
    # every pin carries at least one sha256 hash (pip --require-hashes needs them)
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text)
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9_.-]+==", b))
    return pins


@pytest.mark.parametrize("lock,groups", [("requirements", ["dev"]), ("s3", ["dev", "s3"]),
                                         ("gcs", ["dev", "gcs"]), ("ssh", ["dev", "ssh"])])
def test_lock_pins_every_dependency(lock: str, groups: list[str]) -> None:
    pins = _pins(ROOT / "lock" / f"{lock}.txt")
    reqs = PYPROJECT["dependencies"] + [r for g in groups for r in PYPROJECT["optional-dependencies"][g]]
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        if name == "torch":  # CPU or CUDA build, installed apart from the lock
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in lock/{lock}.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_remote_locks_share_the_main_pins() -> None:
    main = _pins(ROOT / "lock" / "requirements.txt")
    assert not any(n.startswith(("nvidia-cu", "triton")) for n in main)  # no CUDA torch deps
    for extra in ("s3", "gcs", "ssh"):
        pins = _pins(ROOT / "lock" / f"{extra}.txt")
        assert {n: pins.get(n) for n in main} == main, extra


def _install_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_install", ROOT / "lock" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_the_parallel_install_parts_are_the_lock_split_disjointly(jobs: int) -> None:
    """make install's parts (lock/install.py): every pin in exactly one part, with all its
    hashes, each part a requirements file --require-hashes accepts."""
    split_lock = _install_module().split_lock
    text = (ROOT / "lock" / "requirements.txt").read_text()
    parts = split_lock(text, jobs)
    assert len(parts) == jobs
    pinned = [_pins_and_hashes(part) for part in parts]
    names = [n for part in pinned for n in part]
    assert len(names) == len(set(names))  # disjoint
    assert {n: h for part in pinned for n, h in part.items()} == _pins_and_hashes(text)
    sizes = [len(part) for part in pinned]
    assert max(sizes) - min(sizes) <= 1


def _pins_and_hashes(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text)
    found = {}
    for block in blocks:
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if m:
            found[m.group(1)] = (m.group(2), frozenset(re.findall(r"--hash=sha256:(\w+)", block)))
    return found


def test_the_parallel_install_keeps_global_options_and_refuses_a_stray_continuation() -> None:
    module = _install_module()
    text = "--extra-index-url file:///x\n# c\na==1 \\\n    --hash=sha256:aa\nb==2 \\\n    --hash=sha256:bb\n"
    assert module.split_lock(text, 2) == [
        "--extra-index-url file:///x\na==1 \\\n    --hash=sha256:aa\n",
        "--extra-index-url file:///x\nb==2 \\\n    --hash=sha256:bb\n"]
    assert module.split_lock(text, 5) == module.split_lock(text, 2)  # no empty parts
    with pytest.raises(ValueError, match="continuation line before any requirement"):
        module.requirement_blocks("    --hash=sha256:aa\n")
    assert module.main(["two", "lock/requirements.txt"]) == 2  # usage, nothing installed

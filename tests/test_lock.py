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

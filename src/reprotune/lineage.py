"""Lineage: which data, params, code and environment produced a model folder.

Two sources answer it together:

* a run-info file that the stage writes INTO the model folder
  (``reprotune_lineage.json``, see :func:`run_info`): the params it used, the content hash
  of every input, the library versions and the device kind. It travels with the model
  through ``dvc push`` / ``dvc pull``, and holds nothing that changes between identical
  runs (no time stamps, no git commit), so the folder's hash stays reproducible;
* ``dvc.lock`` in git: the stage that wrote the folder, its recorded hash, and upstream
  of it the stages and raw files its inputs came from; ``git log`` gives the commit that
  recorded this exact hash.

``python -m reprotune.lineage models/finetuned`` (``make lineage DIR=...``) prints both.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from reprotune import io

LINEAGE_FILE = "reprotune_lineage.json"
PACKAGES = ("reprotune", "torch", "transformers", "tokenizers", "peft", "accelerate",
            "safetensors", "bitsandbytes", "dvc")


def tree_md5(path: str | Path, *, skip: Iterable[str] = (LINEAGE_FILE,)) -> str:
    """md5 of a file, or of a folder's (relative path, content md5) list in sorted order."""
    path = Path(path)
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in set(skip)):
        h.update(f"{f.relative_to(path).as_posix()}\0{tree_md5(f)}\n".encode())
    return h.hexdigest()


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the libraries that shape a model's bytes, plus Python's.

    The local build tag is left out (``2.13.0``, not ``2.13.0+cpu``): a CPU and a CUDA
    install of the same locked release build the embedded base identically.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_info(stage: str, params: Mapping[str, Any], inputs: Iterable[str | Path],
             device: str, packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """The lineage record a stage writes into its model folder (see the module docstring)."""
    return {"stage": stage, "params": dict(params),
            "inputs": {str(p): tree_md5(p) for p in inputs},
            "versions": versions(packages), "device": device.split(":")[0]}


def write_run_info(out_dir: str | Path, info: Mapping[str, Any]) -> None:
    io.write_json(Path(out_dir) / LINEAGE_FILE, dict(info))


# --------------------------------------------------------------------------- reading
# the pipelines' lock files: the main one, and the demo stage's beside its output
# (data/raw/dvc.yaml: kept apart so that it runs only while ingest.inputs names its file)
SUB_LOCKS = ("data/raw/dvc.lock",)


def _lock(root: Path) -> dict[str, Any]:
    from ruamel.yaml import YAML

    lock = root / "dvc.lock"
    if not lock.is_file():
        raise FileNotFoundError(f"{lock}: not found; run `dvc repro` first")
    stages = dict(YAML(typ="safe", pure=True).load(lock.read_text(encoding="utf-8"))["stages"])
    for sub in SUB_LOCKS:
        if (root / sub).is_file():
            more = YAML(typ="safe", pure=True).load((root / sub).read_text(encoding="utf-8"))
            stages.update((more or {}).get("stages") or {})
    return stages


def producer(stages: Mapping[str, Any], path: str) -> tuple[str, dict[str, Any]] | None:
    """``(stage name, out entry)`` of the stage in dvc.lock that writes ``path``."""
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return name, out
    return None


def upstream(stages: Mapping[str, Any], stage: str) -> list[tuple[str, str, str | None]]:
    """``(dependency path, its md5, the stage that wrote it or None)`` for every data input
    of ``stage`` and, recursively, of the stages upstream of it (code files left out). A
    folder dependency that holds other stages' outputs (``data/raw`` holding the demo data)
    lists those outputs too."""
    seen: set[str] = set()
    rows: list[tuple[str, str, str | None]] = []

    def visit(name: str) -> None:
        for dep in stages[name].get("deps", []):
            path = dep["path"]
            if path in seen or path.startswith(("src/", "stages/")):
                continue
            seen.add(path)
            made = producer(stages, path)
            rows.append((path, dep.get("md5", "?"), made[0] if made else None))
            if made:
                visit(made[0])
            for other, st in stages.items():  # outputs inside a folder dependency
                for out in st.get("outs", []):
                    if out["path"].startswith(path.rstrip("/") + "/") and out["path"] not in seen:
                        seen.add(out["path"])
                        rows.append((out["path"], out.get("md5", "?"), other))
                        visit(other)

    visit(stage)
    return rows


def commit_of(root: Path, md5: str) -> str | None:
    """The first git commit whose dvc.lock recorded ``md5`` (``hash date subject``)."""
    proc = subprocess.run(["git", "log", "--reverse", "-S", md5, "--format=%h %ad %s",
                           "--date=short", "--", "dvc.lock"], cwd=root, capture_output=True,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[0] if proc.returncode == 0 and lines else None


def describe(folder: str | Path, root: str | Path = ".") -> str:
    """A plain-text answer to "which data and code produced this folder?"."""
    root, folder = Path(root), Path(folder)
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    stages = _lock(root)
    made = producer(stages, rel)
    if made is None:
        raise ValueError(f"{rel}: no stage in dvc.lock writes it")
    name, out = made
    lines = [f"{rel}: written by stage `{name}`, dvc.lock md5 {out.get('md5')}"]
    commit = commit_of(root, out.get("md5", "")) if out.get("md5") else None
    lines.append(f"  recorded in git commit: {commit or 'not committed yet'}")
    if (folder / LINEAGE_FILE).is_file():
        info = io.read_json(folder / LINEAGE_FILE)
        lines.append(f"  device: {info.get('device')}; versions: " + ", ".join(
            f"{k} {v}" for k, v in info.get("versions", {}).items() if v))
        for section, values in info.get("params", {}).items():
            lines.append(f"  params {section}: {values}")
        for path, md5 in info.get("inputs", {}).items():
            lines.append(f"  input {path}: {md5}")
    lines.append("  data lineage (dvc.lock):")
    for path, md5, stage in upstream(stages, name):
        origin = f"from stage `{stage}`" if stage else "raw input"
        lines.append(f"    {path} {md5} ({origin})")
    code = [d["path"] for d in stages[name].get("deps", [])
            if d["path"].startswith(("src/", "stages/"))]
    lines.append(f"  code: {len(code)} files hashed in dvc.lock ({', '.join(code[:4])}, ...)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprotune.lineage", description=__doc__)
    ap.add_argument("folder", help="a stage output, e.g. models/finetuned")
    args = ap.parse_args(argv)
    try:
        print(describe(args.folder))
    except (FileNotFoundError, ValueError) as exc:
        print(f"make lineage: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Lineage: which data, params, code and environment produced a model folder.

Two sources answer it together:

* a run-info file that the stage writes INTO the model folder
  (``reprotune_lineage.json``, see :func:`run_info`): the params it used, the content hash
  of every input, the library versions, the device kind and, on CPU, the kernel family
  (``cpu_kernels``: ATen ISA, MKL branch, oneDNN ISA, portable or not). It travels with the model
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
import json
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.cpu_kernels import describe as describe_kernels
from reprotune.cpu_kernels import kernel_family

LINEAGE_FILE = "reprotune_lineage.json"
CODE_PREFIXES = ("src/", "stages/")
CHECK_STAGE = "check"  # validates all of params.yaml; upstream of every other stage
HASHES = ("a file's md5 is the same in dvc.lock and in the run record; for a folder dvc.lock "
          "holds DVC's directory hash (<md5>.dir: the md5 of its list of files and their md5s) "
          f"and the run record reprotune's content md5 (tree_md5: each file's path and md5, "
          f"{LINEAGE_FILE} left out)")
WIDTH = 100  # characters per line: the answer must fit one terminal screen
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
    info = {"stage": stage, "params": dict(params),
            "inputs": {str(p): tree_md5(p) for p in inputs},
            "versions": versions(packages), "device": device.split(":")[0]}
    if info["device"] == "cpu":  # the kernel family the numbers depend on (cpu_kernels.py)
        info["cpu_kernels"] = kernel_family()
    return info


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


def upstream_stages(stages: Mapping[str, Any], stage: str) -> list[str]:
    """``stage`` and every stage upstream of it in dvc.lock, nearest first (breadth first).

    A stage is upstream when it writes one of the data inputs (code files left out) or, for a
    folder input such as ``data/interim/read``, an output inside that folder.
    """
    order, todo = [stage], [stage]
    while todo:
        name = todo.pop(0)
        for dep in _data_deps(stages[name]):
            for other in _writers(stages, dep["path"]):
                if other not in order:
                    order.append(other)
                    todo.append(other)
    return order


def _data_deps(stage: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [d for d in stage.get("deps", []) if not d["path"].startswith(CODE_PREFIXES)]


def _writers(stages: Mapping[str, Any], path: str) -> list[str]:
    """The stages that write ``path`` itself or an output inside the folder ``path``."""
    inside = path.rstrip("/") + "/"
    return [name for name, st in stages.items()
            if any(o["path"] == path or o["path"].startswith(inside) for o in st.get("outs", []))]


def commit_of(root: Path, md5: str) -> str | None:
    """The first git commit whose dvc.lock recorded ``md5`` (``hash date subject``)."""
    proc = subprocess.run(["git", "log", "--reverse", "-S", md5, "--format=%h %ad %s",
                           "--date=short", "--", "dvc.lock"], cwd=root, capture_output=True,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[0] if proc.returncode == 0 and lines else None


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` items of a (nested) params mapping, nested keys dotted; a section
    (``train: {...}``) opens with ``[train]`` and its keys follow without the prefix."""
    items: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value and not prefix:
            items += [f"[{key}]", *_flat(value, " ")]
        elif isinstance(value, Mapping) and value:
            items += _flat(value, f"{prefix.strip()}{key}.")
        else:
            # as YAML spells it (true, null), not as Python does (True, None)
            text = value if isinstance(value, str) else json.dumps(
                value, ensure_ascii=False, separators=(",", ":"))
            items.append(f"{prefix.strip()}{key}={text}")
    return items


def _wrap(items: list[str], head: str, indent: str = " " * 6, width: int = WIDTH) -> list[str]:
    """``items`` joined by spaces after ``head``, continued on ``indent``-ed lines."""
    lines, line, fresh = [], head.rstrip(), True
    for i, item in enumerate(items):
        # a section opens a line of its own, so its keys never start at the end of another
        if not fresh and (len(line) + 1 + len(item) > width or (item.startswith("[") and i)):
            lines.append(line)
            line, fresh = indent[:-1], True  # the join adds the last space
        line += " " + item
        fresh = False
    lines.append(line)
    return lines


def _stage_params(stage: Mapping[str, Any], used: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """The params dvc.lock recorded for a stage as ``key=value`` items, and the sections left
    out because the model's own record says this run did not use them (``used``: the
    ``params`` of its reprotune_lineage.json, e.g. no ``lora`` for ``method: full``)."""
    recorded: dict[str, Any] = {}
    for per_file in (stage.get("params") or {}).values():
        recorded.update(per_file)
    unused = sorted(k for k, v in recorded.items()
                    if used is not None and isinstance(v, Mapping) and k not in used)
    return _flat({k: v for k, v in recorded.items() if k not in unused}), unused


def _origin(stages: Mapping[str, Any], path: str, tracked: set[str], root: Path) -> str:
    writers = _writers(stages, path)
    if writers == [w for w in writers if any(o["path"] == path for o in stages[w]["outs"])] \
            and len(writers) == 1:
        return f"from stage `{writers[0]}`"
    if writers:
        return "folder of the outputs of " + ", ".join(f"`{w}`" for w in writers)
    if (root / f"{path}.dvc").is_file():
        return f"raw input, tracked by {path}.dvc"
    inside = path.rstrip("/") + "/"
    if path in tracked or any(t.startswith(inside) for t in tracked):
        return "in git"
    return "outside DVC and git"


def _git_files(root: Path) -> set[str]:
    proc = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                          check=False)
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else set()


def describe(folder: str | Path, root: str | Path = ".") -> str:
    """A plain-text answer to "what made this folder?" that fits one screen: the stage that
    wrote it, the commit, the run's environment, then every stage upstream of it with the
    params and input hashes dvc.lock recorded for it."""
    root, folder = Path(root), Path(folder)
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    stages = _lock(root)
    made = producer(stages, rel)
    if made is None:
        raise ValueError(f"{rel}: no stage in dvc.lock writes it")
    name, out = made
    md5 = out.get("md5", "?")
    lines = [f"{rel}: written by stage `{name}`; dvc.lock md5 {md5}"]
    commit = commit_of(root, md5) if md5 != "?" else None
    lines.append(f"  recorded in git commit: {commit or 'not committed yet (commit dvc.lock)'}")
    info = io.read_json(folder / LINEAGE_FILE) if (folder / LINEAGE_FILE).is_file() else None
    run_inputs: dict[str, str] = {}
    if info is not None:
        run_inputs = dict(info.get("inputs", {}))
        lines += _wrap([f"{k} {v}," for k, v in info.get("versions", {}).items() if v],
                       f"  the run ({LINEAGE_FILE}): device {info.get('device')};", "    ")
        lines[-1] = lines[-1].rstrip(",")
        if info.get("cpu_kernels"):
            lines += _wrap(describe_kernels(info["cpu_kernels"]).split(), "  CPU kernels:", "    ")
    lines += _wrap(HASHES.split(), "  hashes:", "    ")
    lines.append(f"stages upstream of {rel}, nearest first (params and input hashes from "
                 f"dvc.lock):")
    tracked = _git_files(root)
    order = upstream_stages(stages, name)
    # the check stage reads the whole file; each value is shown at the stage that uses it
    order = [s for s in order if s != CHECK_STAGE] + [s for s in order if s == CHECK_STAGE]
    for stage in order:
        st = stages[stage]
        if stage == CHECK_STAGE:
            lines.append(f"  {stage}: validates all of params.yaml before any stage runs")
            continue
        used = info.get("params") if info is not None and stage == name else None
        items, unused = _stage_params(st, used)
        lines += _wrap(items, f"  {stage}: ") if items else [f"  {stage}: (no params)"]
        if unused:
            lines.append(f"      recorded but unused by this run: {', '.join(unused)}")
        for dep in _data_deps(st):
            if dep["path"] == "metrics/params_ok.json":
                continue  # the check stage's constant marker, upstream of every stage
            where = _origin(stages, dep["path"], tracked, root)
            lines.append(f"      <- {dep['path']} {dep.get('md5', '?')} ({where})")
            if stage == name and run_inputs.get(dep["path"], dep.get("md5")) != dep.get("md5"):
                lines.append(f"         content md5 in the run record: {run_inputs[dep['path']]}")
    code = [d["path"] for d in st.get("deps", []) if d["path"].startswith(CODE_PREFIXES)] \
        if (st := stages[name]) else []
    lines.append(f"  code of `{name}`: {len(code)} files hashed in dvc.lock "
                 f"({', '.join(code[:2])}, ...)" if code else f"  code of `{name}`: none hashed")
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

"""Params presets: a small YAML file of overrides run as one named DVC experiment.

``make repro-real`` runs ``configs/presets/smollm2.yaml``: the real pretrained model, the
``assistant`` demo and the training knobs that suit them. A preset has the shape of
params.yaml but holds only the keys it changes; every leaf becomes one ``-S key=value`` of
``dvc exp run -n <name>``, so the run is an ordinary experiment: ``dvc exp show`` lists it,
DVC's run cache restores it when it already ran, and params.yaml in the workspace shows
exactly what it changed (``git diff params.yaml``; ``git checkout params.yaml dvc.lock &&
dvc checkout`` goes back to the default).

Before DVC runs anything the merged params go through the check stage's validation
(types, ranges, paths), so a bad preset stops with one line naming the key.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reprotune.params import DEFAULT_PARAMS, ParamsError, check_paths, read_params
from reprotune.team.tune_space import validate, with_overrides
from reprotune.team.tune_trial import fmt


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested mapping (a list or scalar is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_preset(path: str | Path) -> dict[str, Any]:
    """The overrides of a preset file, as dotted keys; a file that is no mapping is refused."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such preset file (presets live in configs/presets/)")
    tree = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    if not isinstance(tree, dict) or not tree:
        raise ParamsError(f"{path}: a preset is a mapping shaped like params.yaml")
    return leaves(tree)


def check_preset(overrides: dict[str, Any], params: str | Path = DEFAULT_PARAMS,
                 root: str | Path = ".") -> dict[str, Any]:
    """params.yaml with the overrides applied, validated as the check stage would."""
    raw = read_params(params)
    known = leaves(raw)
    for key in overrides:  # a new key under a known section is caught by validate() below
        if key not in known and key.split(".")[0] not in raw:
            raise ParamsError(f"{key}: not a params.yaml key")
    merged = with_overrides(raw, overrides)
    validate(merged)
    check_paths(merged, root)
    return merged


def command(overrides: dict[str, Any], name: str) -> list[str]:
    """The ``dvc exp run`` that runs the preset."""
    args = [sys.executable, "-m", "dvc", "exp", "run", "-n", name]
    for key, value in overrides.items():
        args += ["-S", f"{key}={fmt(value)}"]
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprotune.team.preset", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a preset file, e.g. configs/presets/smollm2.yaml")
    ap.add_argument("--name", help="experiment name (default: the file's stem)")
    ap.add_argument("--dry", action="store_true", help="print the dvc command, run nothing")
    args = ap.parse_args(argv)
    try:
        overrides = load_preset(args.preset)
        check_preset(overrides)
    except ParamsError as exc:
        print(f"preset: {exc}", file=sys.stderr)
        return 2
    cmd = command(overrides, args.name or Path(args.preset).stem)
    print("dvc " + " ".join(shlex.quote(a) for a in cmd[3:]), flush=True)
    if args.dry:
        return 0
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())

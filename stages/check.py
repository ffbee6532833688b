"""DVC stage `check`: validate the whole params.yaml before any other stage runs.

Every stage validates params.yaml itself, but DVC deletes a stage's outputs before starting
it: a mistyped `train.*` key would otherwise cost the previous `models/finetuned`. This
stage sits upstream of every other one and depends on the whole file, so a mistake stops
`dvc repro` / `dvc exp run` here, before anything is deleted. Its output never changes, so
passing the check reruns nothing downstream. It also checks that the params naming files or
folders (model.name as a local path, ingest.inputs, train.accelerate_config) name existing
ones, which the other stages' own loading does not (they may run from elsewhere).
"""

from __future__ import annotations

import argparse

from reprotune import io, runtime
from reprotune.params import check_paths, read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="metrics/params_ok.json")
    args = ap.parse_args()
    log = runtime.setup("check")  # raises, naming the key, when anything in params.yaml is wrong
    check_paths(read_params())  # a missing model folder or input, before DVC deletes outputs
    io.write_json(args.out, {"params.yaml": "valid"})
    log.info("params.yaml is valid")


if __name__ == "__main__":
    main()

"""DVC stage `check`: validate the whole params.yaml before any other stage runs.

Every stage validates params.yaml itself, but DVC deletes a stage's outputs before starting
it: a mistyped `train.*` key would otherwise cost the previous `models/finetuned`. This
stage sits upstream of every other one and depends on the whole file, so a mistake stops
`dvc repro` / `dvc exp run` here, before anything is deleted. Its output never changes, so
passing the check reruns nothing downstream. It also checks that the params naming files or
folders (model.name as a local path, ingest.inputs, train.accelerate_config) name existing
ones, which the other stages' own loading does not (they may run from elsewhere).

`format.mode` must fit the inputs' layout (reprotune.data.layouts): text documents
({"text": ...} rows, .txt files) need `text`, conversations `chat`; the first rows of each
local input are looked at and a mismatch fails here, naming format.mode and what to set.

Every `align.method` but none also needs preference pairs in the train split: when the split
exists and was built from the current ingest.inputs (any run after the first that keeps
them), its pairs are counted here, so a switch to dpo, orpo, simpo or kto on data without
pairs fails before align's and evaluate's outputs are deleted. After a change of inputs the
split is stale and the align stage counts the new split's pairs itself.

Unpaired KTO rows (a desirable/undesirable flag) are trained on by `align.method: kto`
only: with any other method (none included, where SFT would learn the desirable answers
and nothing the undesirable ones) the check refuses, saying to set align.method: kto.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reprotune import io, runtime
from reprotune.data.layouts import LayoutError, check_layouts
from reprotune.data.preference import (
    PairsError,
    built_from,
    check_pairs,
    check_unpaired,
    count_pairs,
    count_unpaired,
)
from reprotune.params import check_paths, load_section, read_params

TRAIN_SPLIT = Path("data/interim/splits/train.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="metrics/params_ok.json")
    args = ap.parse_args()
    log = runtime.setup("check")  # raises, naming the key, when anything in params.yaml is wrong
    check_paths(read_params())  # a missing model folder or input, before DVC deletes outputs
    align = load_section("align")
    inputs = load_section("ingest").inputs
    if TRAIN_SPLIT.is_file() and built_from(TRAIN_SPLIT, inputs):
        try:
            unpaired = count_unpaired(TRAIN_SPLIT)
            check_unpaired(align.method, unpaired, str(TRAIN_SPLIT))
            if align.method != "none":
                check_pairs(align.method, 0, count_pairs(TRAIN_SPLIT), None, str(TRAIN_SPLIT),
                            unpaired_train=sum(unpaired.values()))
        except PairsError as exc:
            raise SystemExit(f"check: {exc}") from None
    try:  # text documents need format.mode: text, conversations chat
        check_layouts(inputs, load_section("format").mode, load_section("ingest").columns)
    except LayoutError as exc:
        raise SystemExit(f"check: {exc}") from None
    io.write_json(args.out, {"params.yaml": "valid"})
    log.info("params.yaml is valid")


if __name__ == "__main__":
    main()

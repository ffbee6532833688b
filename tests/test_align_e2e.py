"""End to end with a real preference file: `dvc repro` in a fresh copy of the repository on
the first 60 rows of ../shared/data/dpo_en_demo.json (sharegpt + chosen/rejected objects,
as written there; all 300 rows took 190 s in the suite, mostly scoring long pairs), SFT then
DPO, then a `dvc exp run -S align.beta=...` that reruns only align onward. Skips without
../shared.
Targets `evaluate merge`: quantize (downstream of merge, covered by tests/test_e2e.py and
tests/test_quantize.py) would add two runs that assert nothing about alignment."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pipeline_cli import dvc, ran, run, tiny_overrides
from ruamel.yaml import YAML

from reprotune import io

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

OVERRIDES = {  # the embedded model, small: a few SFT and DPO steps, a few generated answers
    **tiny_overrides(),
    ("ingest", "inputs"): ["data/raw/dpo_en_demo.json"],
    ("demo", "rows"): 10,
    ("split", "stratify"): None,
    ("split", "group"): None,
    ("train", "max_steps"): 2,  # SFT is only DPO's starting point here
    ("train", "eval_steps"): 2,
    ("eval", "max_rows"): 4,
    ("eval", "max_new_tokens"): 8,
    ("quantize", "methods"): ["int8_dynamic"],
    ("quantize", "eval_rows"): 4,
    ("align", "method"): "dpo",
    ("align", "max_steps"): 2,
    ("align", "eval_steps"): 1,
    ("align", "batch_size"): 4,
    ("align", "lr"): 1e-4,
    ("align", "patience"): 0,
}


def _run(args: list[str], cwd: Path) -> str:
    return run(args, cwd, timeout=1800)


def _dvc(cwd: Path, *args: str) -> str:
    return dvc(cwd, *args, timeout=1800)


_ran = ran
ROWS = 60  # 22 of their pairs exceed the tiny model's 1024-token context (dropped whole)
TARGETS = ("evaluate", "merge")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    dst = tmp_path_factory.mktemp("align_e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    (dst / "dvc.lock").unlink(missing_ok=True)
    raw = json.loads((shared_dir / "data" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    (dst / "data/raw/dpo_en_demo.json").write_text(
        json.dumps(raw[:ROWS], ensure_ascii=False, indent=2), encoding="utf-8")
    yaml = YAML()
    params = yaml.load((dst / "params.yaml").read_text())
    for keys, value in OVERRIDES.items():
        node = params
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    with (dst / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    _run(["git", "init", "-q", "-b", "main"], dst)
    _run(["git", "add", "-A"], dst)
    _run(["git", "commit", "-qm", "init"], dst)
    return dst


def test_real_pairs_through_dvc_repro_then_a_beta_experiment(project: Path) -> None:
    out = _dvc(project, "repro", *TARGETS)
    assert {"ingest", "format", "train", "ref_logps", "align", "evaluate", "merge"} <= _ran(out)
    m = lambda name: json.loads((project / "metrics" / f"{name}.json").read_text())  # noqa: E731
    ingest = m("ingest")
    assert ingest["rows_in"] == ROWS == ingest["kept"] + ingest["rejected_total"]
    assert ingest["with_preference"] == ingest["kept"] > 50

    # both answers of every kept pair are the file's, byte for byte
    raw = json.loads((project / "data/raw/dpo_en_demo.json").read_text(encoding="utf-8"))
    triples = {(r["conversations"][-1]["value"], r["chosen"]["value"], r["rejected"]["value"])
               for r in raw}
    pref = m("format")["preference"]
    assert pref["pairs_in"] == pref["pairs_out"] + sum(pref["dropped"].values())
    rows = {s: io.read_jsonl(project / f"data/processed/pairs/{s}.jsonl")
            for s in ("train", "val", "test")}
    # the tiny model's 1024-token context: long pairs are dropped whole, never cut
    assert sum(map(len, rows.values())) == pref["pairs_out"] > 20
    assert pref["dropped"]["pair_too_long"] > 0
    for row in (r for split in rows.values() for r in split):
        assert (row["prompt"][-1]["content"], row["chosen"][-1]["content"],
                row["rejected"][-1]["content"]) in triples
    dropped = io.read_jsonl(project / "data/processed/pairs/dropped.jsonl")
    assert len(dropped) == sum(pref["dropped"].values())

    align = m("align")
    assert align["method"] == "dpo" and align["train_steps"] == 2
    assert align["train_pairs"] == len(rows["train"]) and "train_time_s" not in align
    assert align["ref_logps_cached"]  # the ref_logps stage's, not recomputed
    ev, gain = m("eval"), m("eval_gain")
    assert ev["preference"]["pairs"] == len(rows["test"])
    assert ev["preference"]["sft"]["reward_accuracy"] == 0.5
    assert set(gain["preference"]) >= {"reward_accuracy", "mean_margin", "chosen_logp_shift"}
    assert ev["settings"]["model"] == "models/aligned" and "bleu" in ev  # generation still scored
    assert "## Preference pairs" in (project / "reports/eval.md").read_text(encoding="utf-8")
    assert (project / "metrics/align_curves/plots/metrics/val_rewards_accuracies.tsv").is_file()

    assert _ran(_dvc(project, "repro", *TARGETS)) == set()  # a second run is a no-op
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline"], project)
    ran = _ran(_dvc(project, "exp", "run", "-S", "align.beta=0.3", "-n", "beta", *TARGETS))
    assert {"align", "evaluate", "merge"} <= ran
    # the reference log-probs do not depend on beta: computed once, read back
    assert not ran & {"ingest", "format", "train", "eval_base", "split", "base", "ref_logps"}

"""Scorecards (the compared subset of each stage's record) and stale-stage detection."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from reprotune import scorecard
from reprotune.team import exps, staleness
from reprotune.team.tune_space import ParamSpace
from reprotune.team.tune_trial import suggest

TRAIN_RECORD = {
    "best_val_loss": 0.94754, "final_train_loss": 0.347937, "train_steps": 74,
    "tokens_seen": 34812, "attention": "sdpa per sample", "mode_note": "fp32, ATen AVX2",
    "precision": "fp32", "trainable_share": 1.0,
}
GAIN_RECORD = {
    "gain": {"bleu": 30.01898, "chrf": 25.25, "rouge_l": 0.47},
    "intervals": {"bleu": {"diff": 30.01898, "low": 18.585731, "high": 48.398582,
                           "verdict": "better"},
                  "chrf": {"diff": 25.2, "low": 14.5, "high": 42.0, "verdict": "better"},
                  "n_a": 36, "resamples": 1000},
    "forgetting": {"base": 17.93, "finetuned": 17.17, "diff": -0.758407, "low": -1.2,
                   "high": -0.3, "verdict": "better", "rows": 60},
}
QUANTIZE_RECORD = {
    "gguf_q8_0": {"size_mb": 163.4255, "ppl_delta_pct": -0.0015, "gate": "met",
                  "render_sha256": "08cf", "worst_layer": "model.layers.0.self_attn.o_proj"},
    "bnb_nf4": {"size_mb": 164.1411, "ppl_delta_pct": 28.1973, "gate": "missed"},
    "merged": {"size_mb": 516.5261, "status": "ok"},
    "chat_template_sha256": "872b", "n_eval_rows": 36,
}


def test_a_scorecard_keeps_the_compared_keys_with_their_names_and_nesting() -> None:
    assert scorecard.select("train", TRAIN_RECORD) == {
        "best_val_loss": 0.94754, "final_train_loss": 0.347937, "train_steps": 74}
    assert scorecard.select("eval_gain", GAIN_RECORD) == {
        "gain": {"bleu": 30.01898},
        "intervals": {"bleu": {"low": 18.585731, "high": 48.398582, "verdict": "better"}},
        "forgetting": {"diff": -0.758407, "verdict": "better"}}
    # per quantization method: size, perplexity change, gate; not the merged reference
    assert scorecard.select("quantize", QUANTIZE_RECORD) == {
        "gguf_q8_0": {"size_mb": 163.4255, "ppl_delta_pct": -0.0015, "gate": "met"},
        "bnb_nf4": {"size_mb": 164.1411, "ppl_delta_pct": 28.1973, "gate": "missed"}}
    assert scorecard.select("demo", {"rows": 400}) == {}


def test_write_puts_the_scorecard_beside_the_record(tmp_path: Path) -> None:
    record = tmp_path / "metrics" / "train.json"
    record.parent.mkdir()
    path = scorecard.write(record, TRAIN_RECORD)
    assert path == tmp_path / "metrics" / "scorecard" / "train.json"
    assert json.loads(path.read_text())["best_val_loss"] == 0.94754


def test_the_default_pipeline_declares_few_metric_columns() -> None:
    """dvc exp show shows one column per metric key: the declared metrics files of the
    default pipeline stay a table a person reads (issue: 462 metric columns before)."""
    from ruamel.yaml import YAML

    dvc = YAML(typ="safe").load(Path("dvc.yaml").read_text(encoding="utf-8"))
    declared = [next(iter(m)) if isinstance(m, dict) else m
                for st in dvc["stages"].values() for m in st.get("metrics") or []]
    assert all(p.startswith("metrics/scorecard/") or p == "metrics/review.json"
               for p in declared), declared
    # the most a default run can write: every key of every scorecard, two quantize methods
    most = sum(len(v) for v in scorecard.KEYS.values()) + 2 * len(scorecard.QUANTIZE_KEYS) + 2
    assert most <= 40, most


def _lock(train_out: str, eval_dep: str) -> dict:
    return {"stages": {
        "train": {"deps": [{"path": "data/train.parquet", "md5": "d1"}],
                  "outs": [{"path": "models/finetuned", "md5": train_out},
                           {"path": "metrics/scorecard/train.json", "md5": "t"}]},
        "evaluate": {"deps": [{"path": "models/finetuned", "md5": eval_dep}],
                     "outs": [{"path": "metrics/scorecard/eval.json", "md5": "e"}]},
        "merge": {"deps": [{"path": "models/finetuned", "md5": eval_dep}],
                  "outs": [{"path": "models/merged", "md5": "m"}]},
        "quantize": {"deps": [{"path": "models/merged", "md5": "m"}],
                     "outs": [{"path": "metrics/scorecard/quantize.json", "md5": "q"}]},
    }}


def test_stages_that_did_not_rerun_after_their_input_changed_are_stale() -> None:
    assert staleness.stale_stages(_lock("new", "new")) == set()
    # train reran (a trial stopping after train); evaluate and merge still list the old model,
    # and quantize follows merge's (stale) output
    assert staleness.stale_stages(_lock("new", "old")) == {"evaluate", "merge", "quantize"}
    assert staleness.stale_outputs(_lock("new", "old")) == {
        "metrics/scorecard/eval.json", "models/merged", "metrics/scorecard/quantize.json"}


def test_make_exps_marks_the_values_of_stale_stages() -> None:
    fresh = exps.ExpRow("exp-a", "a" * 40, "experiment", "main", {"lr": 1e-4},
                        {"metrics/scorecard/train.json": {"best_val_loss": 1.2},
                         "metrics/scorecard/eval.json": {"bleu": 30.5}})
    stale = exps.ExpRow("exp-b", "b" * 40, "experiment", "main", {"lr": 3e-4},
                        {"metrics/scorecard/train.json": {"best_val_loss": 1.1},
                         "metrics/scorecard/eval.json": {"bleu": 30.5}},
                        stale=frozenset({"metrics/scorecard/eval.json"}))
    header, body = exps.table([fresh, stale])
    assert header[:3] == ["Experiment", "lr", "best_val_loss"] and header[3] == "bleu"
    rows = {r[0]: r for r in body}
    assert rows["exp-a"][3] == 30.5
    assert rows["exp-b"][3] == f"30.5 {exps.STALE}"
    assert rows["exp-b"][2] == 1.1  # train reran: its value is its own
    # a full record's name reads its scorecard (tune metrics, --sort-by)
    assert exps.metric(stale, "metrics/train.json:best_val_loss") == 1.1


@pytest.mark.parametrize(("drawn", "written"), [(0.00010000000000000009, 1e-4),
                                                 (0.000123456789, 0.0001235),
                                                 (0.0009999999, 0.001)])
def test_tune_writes_a_drawn_float_as_a_person_would(drawn: float, written: float) -> None:
    space = ParamSpace("lr", "log", low=1e-5, high=1e-3)
    value = suggest(optuna.trial.FixedTrial({"lr": drawn}), space)
    assert value == written and repr(value) == repr(written)


@pytest.mark.slow  # > 5 s: make test runs it, make test-fast does not
def test_an_experiment_stopped_at_a_target_shows_later_stages_stale(tmp_path: Path) -> None:
    """Real DVC: `dvc exp run <first stage>` commits the second stage's old metrics; the
    experiment's dvc.lock says so, and make exps marks the value."""
    import os

    from toy_repos import dvc, run

    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text("lr: 1\n")
    (root / "a.py").write_text("from pathlib import Path\n"
                               "Path('a.txt').write_text(Path('params.yaml').read_text()[4:])\n")
    (root / "b.py").write_text("import json\nfrom pathlib import Path\n"
                               "json.dump({'bleu': float(Path('a.txt').read_text()),"
                               " 'best_val_loss': 1.0}, open('metrics/b.json', 'w'))\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: python a.py\n    deps: [a.py]\n    params: [lr]\n"
        "    outs: [a.txt]\n  b:\n    cmd: python b.py\n    deps: [b.py, a.txt]\n"
        "    metrics:\n      - metrics/b.json: {cache: false}\n")
    (root / "metrics").mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    dvc(root, "init", "-q")
    dvc(root, "repro", "-q")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    dvc(root, "exp", "run", "-q", "-S", "lr=2", "-n", "only-a", "a")
    dvc(root, "exp", "run", "-q", "-S", "lr=3", "-n", "both")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        shown = {r.label: r for r in exps.show_json()}
    finally:
        os.chdir(cwd)
    assert shown["only-a"].stale == {"metrics/b.json"}  # b did not run on lr=2's a.txt
    assert shown["both"].stale == frozenset() and shown["main"].stale == frozenset()
    _, body = exps.table([shown["only-a"], shown["both"]], sort_by="metrics/b.json:bleu")
    cells = {r[0]: r for r in body}
    assert cells["only-a"][-1] == f"1 {exps.STALE}"  # the baseline's value, marked
    assert cells["both"][-1] == 3.0

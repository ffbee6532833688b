"""End to end, the way a user runs it: `dvc repro` in a fresh copy of the repository, then
`dvc exp run -S ...`, `dvc exp show` and `dvc metrics diff`, asserting values and reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pipeline_cli import dvc as _dvc
from pipeline_cli import env as _env
from pipeline_cli import ran as _ran
from pipeline_cli import run as _run
from pipeline_cli import tiny_overrides, unexplained_empty
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DEMO = "data/raw/dvc.yaml:demo"  # the demo stage, apart so it runs only while an input names it

# Small but complete: every stage runs, on fewer rows/steps (2 epochs over ~370 train rows:
# 46 steps, about 5 s, where the preset's 4 epochs take 10 s and this module trains 8 times),
# quantize with one torch and one GGUF artifact (tests/test_quantize.py builds
# and measures all seven; each costs a fresh measuring process per pipeline run here).
OVERRIDES = {  # the embedded model (params.yaml's default is the real SmolLM2), smaller
    **tiny_overrides(),
    ("epochs",): 2,
    ("demo", "rows"): 500,
    ("train", "eval_steps"): 5,
    ("eval", "max_rows"): 24,
    ("quantize", "methods"): ["int8_dynamic", "gguf_q8_0"],
    ("quantize", "eval_rows"): 8,
}


def _experiments(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}."""
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name"):
                    found[rev["name"]] = rev["data"]
    return found


def _loss_points(plots_json: str) -> dict[str, list[tuple[str, int]]]:
    """`dvc plots show/diff --json` -> {curve file: [(revision, step), ...]} of the loss plot."""
    points: dict[str, list[tuple[str, int]]] = {}
    for plot in json.loads(plots_json)["data"]["Loss curves"]:
        for v in plot["content"]["data"]["values"]:
            points.setdefault(v["filename::field"].split("::")[0], []).append(
                (v["rev"], int(v["step"])))
    return points


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    yaml = YAML()
    params = yaml.load((dst / "params.yaml").read_text())
    for keys, value in OVERRIDES.items():
        node = params
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    with (dst / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    # A fresh start: no committed lock or outputs from the source checkout.
    (dst / "dvc.lock").unlink(missing_ok=True)
    (dst / "data" / "raw" / "dvc.lock").unlink(missing_ok=True)  # the demo stage's
    _run(["git", "init", "-q", "-b", "main"], dst)
    _run(["git", "add", "-A"], dst)
    _run(["git", "commit", "-qm", "init"], dst)
    return dst


def test_repro_then_noop(project: Path) -> None:
    out = _dvc(project, "repro")
    # the demo has no preference pairs (and format drops no row): each of DVC's "is empty"
    # warnings comes with the stage's one line saying why
    assert "WARNING: 'data/processed/pairs/test.jsonl' is empty." in out
    assert "data/processed/pairs/test.jsonl is empty: no preference pairs" in out
    assert not unexplained_empty(out), out[-6000:]
    assert {"check", DEMO, "read@data/raw/demo.jsonl", "ingest", "base", "dedup", "redact",
            "format", "split", "train"} <= _ran(out)
    m = lambda name: json.loads((project / "metrics" / f"{name}.json").read_text())  # noqa: E731

    ingest = m("ingest")
    assert ingest["rows_in"] == ingest["kept"] + sum(ingest["rejected"].values())
    assert sum(ingest["rejected"].values()) >= 5  # the demo plants malformed lines
    dedup = m("dedup")
    assert dedup["in"] == ingest["kept"]
    assert dedup["in"] == dedup["kept"] + sum(dedup["dropped"].values())
    assert dedup["dropped"]["exact_duplicate"] > 0 and dedup["dropped"]["near_duplicate"] > 0
    redact = m("redact")  # the demo holds no PII: every row passes
    assert redact["in"] == dedup["kept"] == redact["kept"] + redact["dropped"]
    split = m("split")
    fmt = m("format")
    # every kept row is in a split or dropped from val/test as a near-copy of train, and
    # format sees exactly the split rows, split by split
    assert sum(split["counts"].values()) + sum(split["leakage"]["dropped"].values()) \
        == redact["kept"] == split["rows"]
    assert {s: v["rows_in"] for s, v in fmt["splits"].items()} == split["counts"]
    assert fmt["rows_in"] == fmt["rows_out"] + sum(fmt["dropped"].values())
    train = m("train")
    # it learned: 7.21 -> 3.92 in the 46 steps of 2 epochs (the tiny preset's 4: 2.95)
    assert train["best_val_loss"] < 0.6 * train["initial_val_loss"], train

    # the loss plot as `dvc plots show` draws it: train and val curves, val from step 0
    points = _loss_points(_dvc(project, "plots", "show", "--json"))
    assert set(points) == {"train_loss.tsv", "val_loss.tsv"}
    val_steps = [step for _, step in points["val_loss.tsv"]]
    assert val_steps[0] == 0 and val_steps[-1] == train["train_steps"]

    again = _dvc(project, "repro")
    assert _ran(again) == set()
    assert "up to date" in again.lower()
    notes = project / "data" / "raw" / "notes.txt"  # a stray file beside the inputs
    notes.write_text("not data")
    assert "up to date" in _dvc(project, "status").lower()  # ingest reads listed files only
    notes.unlink()
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline"], project)
    lineage = _run([sys.executable, "-m", "reprotune.lineage", "models/finetuned"], project)
    assert "written by stage `train`" in lineage and "baseline" in lineage  # the commit
    assert "data/raw/demo.jsonl" in lineage and "(from stage `demo`)" in lineage
    assert "<- data/processed/train.parquet " in lineage and "transformers 5." in lineage
    # every stage upstream of the model, each with the params dvc.lock recorded for it
    for upstream in ("format:", "base: [model] name=tiny", "split: [split]", "redact: [redact]",
                     "dedup: [dedup]",
                     "ingest: ingest.inputs=", "read@data/raw/demo.jsonl:", "demo: [demo]"):
        assert f"\n  {upstream}" in lineage, upstream
    # one screen: 51 lines on the default pipeline since format records ingest.mixture
    assert "group_by_length" not in lineage and len(lineage.splitlines()) <= 55

    # Retraining with the same code, params and data changes no tracked file: the model,
    # metrics and curves are identical on CPU, and timings live in the untracked
    # metrics/timing/ (so dvc.lock and `dvc metrics diff` stay quiet).
    timing = project / "metrics" / "timing" / "train.json"
    timing.unlink()
    assert _ran(_dvc(project, "repro", "-f", "-s", "train")) == {"train"}
    assert _run(["git", "status", "--porcelain"], project) == ""
    assert json.loads(timing.read_text())["tokens_per_s"] > 0
    assert "tokens_per_s" not in m("train") and not list(project.rglob(".*.tmp"))


def test_params_typo_stops_before_any_output_is_deleted(project: Path) -> None:
    """DVC deletes a stage's outputs before running it: the check stage must fail first."""
    params_file = project / "params.yaml"
    good = params_file.read_text()
    weights = project / "models" / "finetuned" / "model.safetensors"
    before = weights.read_bytes()
    params_file.write_text(good.replace("  patience:", "  patiance:"))
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.patiance: unknown key (did you mean 'patience'?)" in out
    assert _ran(out) == {"check"} and weights.read_bytes() == before
    params_file.write_text(good)
    assert _ran(_dvc(project, "repro")) <= {"check"}  # nothing else was invalidated
    assert _run(["git", "status", "--porcelain"], project) == ""


def test_teammate_pulls_and_recomputes_nothing(project: Path, tmp_path: Path) -> None:
    """Clone A pushes to a local-folder remote; clone B pulls: clean status, nothing reruns.
    B then adds data and pushes; A pulls and exactly the stages downstream of it rerun."""
    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "-d", "team", str(remote))
    _dvc(project, "push")
    _run(["git", "add", ".dvc/config"], project)
    _run(["git", "commit", "-qm", "team remote"], project)

    b = tmp_path / "b"
    _run(["git", "clone", "-q", str(project), str(b)], tmp_path)
    _dvc(b, "pull")
    assert "up to date" in _dvc(b, "status").lower()
    out = _dvc(b, "repro")
    assert _ran(out) == set() and "up to date" in out.lower()
    assert _run(["git", "status", "--porcelain"], b) == ""

    # B brings one more raw file (tracked with dvc add) and lists it
    extra = b / "data" / "raw" / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "团队新增的问题？", "output": "新的答案。"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    _dvc(b, "add", "data/raw/extra.jsonl")
    yaml = YAML()
    params = yaml.load((b / "params.yaml").read_text())
    params["ingest"]["inputs"].append("data/raw/extra.jsonl")
    with (b / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    _run(["git", "add", "-A"], b)
    _run(["git", "commit", "-qm", "more data"], b)
    _dvc(b, "push")
    _run(["git", "push", "-q", "origin", "HEAD:incoming"], b)

    _run(["git", "merge", "-q", "--ff-only", "incoming"], project)
    try:
        _dvc(project, "pull", "data/raw/extra.jsonl.dvc")
        status = _dvc(project, "status")
        assert "ingest:" in status and f"{DEMO}:" not in status
        assert "read@data/raw/demo.jsonl" not in status  # the unchanged input is not reread
        # the new input is read, and what is downstream of it reruns (up to split here, to
        # keep the test short); nothing upstream does
        assert _ran(_dvc(project, "repro", "split")) == {
            "check", "read@data/raw/extra.jsonl", "ingest", "dedup", "redact", "split"}
        assert json.loads((project / "metrics" / "ingest.json").read_text())["files"][
            "data/raw/extra.jsonl"] == {"rows_in": 1, "kept": 1, "rejected": {}}
    finally:
        _run(["git", "reset", "-q", "--hard", "HEAD~1"], project)  # back to the shared baseline
        (project / "data" / "raw" / "extra.jsonl").unlink(missing_ok=True)
        (project / "data" / "raw" / "extra.jsonl.dvc").unlink(missing_ok=True)
        _dvc(project, "checkout", "--force")
    assert _ran(_dvc(project, "repro")) == set()


def test_lr_experiment_reruns_only_training_onward(project: Path) -> None:
    out = _dvc(project, "exp", "run", "-S", "lr=1e-4", "-n", "low-lr")
    ran = _ran(out)
    assert {"train", "evaluate", "merge", "quantize"} <= ran
    assert not ran & {DEMO, "read@data/raw/demo.jsonl", "ingest", "base", "dedup", "redact", "format",
                      "split", "eval_base"}
    diff = _dvc(project, "metrics", "diff", "--json")
    changed = json.loads(diff)
    assert any("eval.json" in path for path in changed), diff
    # `dvc plots diff`: the baseline commit's loss curves beside the experiment's
    revs = {rev for pts in _loss_points(_dvc(project, "plots", "diff", "--json")).values()
            for rev, _ in pts}
    assert len(revs) == 2 and "workspace" in revs, revs
    exp = _experiments(json.loads(_dvc(project, "exp", "show", "--json")))["low-lr"]
    assert exp["params"]["params.yaml"]["data"]["lr"] == 1e-4
    assert exp["metrics"]["metrics/scorecard/train.json"]["data"]["best_val_loss"] > 0
    # the table a person reads: the compared numbers only (the full records are cached
    # outputs, not metrics), so `dvc exp show --only-changed` fits a screen
    header = _dvc(project, "exp", "show", "--only-changed", "--csv").splitlines()[0].split(",")
    assert "lr" in header and "best_val_loss" in header and len(header) <= 40, header
    assert not any(c.startswith("attention") or "sha256" in c for c in header), header


def test_dedup_threshold_experiment_reruns_from_dedup(project: Path) -> None:
    baseline_dedup = json.loads((project / "metrics" / "dedup.json").read_text())
    # 0.6, not 0.8: on these 500 rows 0.8 drops exactly the rows 0.85 does, and DVC then
    # rightly skips split onward (their input did not change). lr=1e-3 undoes the last exp's.
    # up to train: evaluating, merging and quantizing after a data change would repeat what
    # the lr experiment above and the sweep below already check
    out = _dvc(project, "exp", "run", "-S", "dedup.threshold=0.6", "-S", "lr=1e-3",
               "-n", "strict-dedup", "train")
    ran = _ran(out)
    # base too: the embedded tokenizer is trained on the train split
    assert {"dedup", "split", "base", "format", "train"} <= ran
    assert not ran & {DEMO, "read@data/raw/demo.jsonl", "ingest"}
    dedup = json.loads((project / "metrics" / "dedup.json").read_text())
    assert dedup["dropped"]["near_duplicate"] > baseline_dedup["dropped"]["near_duplicate"]
    exps = _experiments(json.loads(_dvc(project, "exp", "show", "--json")))
    assert {"low-lr", "strict-dedup"} <= set(exps)  # both, each with its params and metrics
    params = exps["strict-dedup"]["params"]["params.yaml"]["data"]
    assert params["dedup"]["threshold"] == 0.6 and params["lr"] == 1e-3
    assert exps["low-lr"]["params"]["params.yaml"]["data"]["dedup"]["threshold"] == 0.85
    assert exps["strict-dedup"]["metrics"]["metrics/scorecard/train.json"]["data"][
        "best_val_loss"] != exps["low-lr"]["metrics"]["metrics/scorecard/train.json"]["data"][
        "best_val_loss"]  # each experiment its own trained model


def test_queued_sweep_stops_at_evaluate_and_the_best_is_promoted(project: Path) -> None:
    """A 2-point queued sweep that ends at `evaluate` (no merge/quantize), then `dvc exp
    apply` and `dvc exp branch` promote the better point. One point (lr=1e-4) ran before as
    the low-lr experiment: its queued run restores train and evaluate from the run cache."""
    _run(["git", "reset", "-q", "--hard"], project)
    _dvc(project, "checkout", "--force")
    _dvc(project, "exp", "run", "--queue", "evaluate", "-S", "lr=1e-4,2e-3")
    _dvc(project, "exp", "run", "--run-all", "-j", "1")
    exps = _experiments(json.loads(_dvc(project, "exp", "show", "--json")))
    sweep = {name: e for name, e in exps.items() if name not in ("low-lr", "strict-dedup")
             and e["params"]["params.yaml"]["data"]["lr"] in (1e-4, 2e-3)}
    assert len(sweep) == 2, sweep.keys()
    for e in sweep.values():  # each point trained (or was restored) and evaluated
        assert e["metrics"]["metrics/scorecard/eval.json"]["data"]["perplexity"] > 0
    for name, e in sweep.items():
        log = _dvc(project, "queue", "logs", name)
        if e["params"]["params.yaml"]["data"]["lr"] == 1e-4:  # the low-lr experiment's outputs
            assert "Stage 'train' is cached - skipping run" in log, log[-3000:]
            assert "Stage 'evaluate' is cached - skipping run" in log, log[-3000:]
            for scorecard in ("train", "eval"):
                key = f"metrics/scorecard/{scorecard}.json"
                assert e["metrics"][key] == exps["low-lr"]["metrics"][key]
        else:
            assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    best = min(sweep, key=lambda n: sweep[n]["metrics"]["metrics/scorecard/train.json"]["data"][
        "best_val_loss"])
    _dvc(project, "exp", "branch", best, "best-lr")
    branch_params = YAML(typ="safe").load(_run(["git", "show", "best-lr:params.yaml"], project))
    assert branch_params["lr"] == sweep[best]["params"]["params.yaml"]["data"]["lr"]
    _dvc(project, "exp", "apply", best)
    applied = YAML().load((project / "params.yaml").read_text())
    assert applied["lr"] == sweep[best]["params"]["params.yaml"]["data"]["lr"]
    _run(["git", "reset", "-q", "--hard"], project)
    _dvc(project, "checkout", "--force")


def test_an_experiment_that_already_ran_is_restored_from_the_run_cache(project: Path) -> None:
    """`dvc exp run -S lr=X` for an X that ran before (low-lr): no stage runs, every stage
    from train on is restored from DVC's run cache, with the outputs that run wrote."""
    _run(["git", "reset", "-q", "--hard"], project)
    _dvc(project, "checkout", "--force")
    t0 = time.perf_counter()
    out = _dvc(project, "exp", "run", "-S", "lr=1e-4", "-n", "low-lr-again")
    seconds = time.perf_counter() - t0
    assert _ran(out) == set(), out
    restored = set(re.findall(r"Stage '([\w@./-]+)' is cached - skipping run", out))
    assert {"train", "align", "evaluate", "merge", "quantize"} <= restored
    exps = _experiments(json.loads(_dvc(project, "exp", "show", "--json")))
    assert exps["low-lr-again"]["metrics"] == exps["low-lr"]["metrics"]
    lock = lambda name: YAML(typ="safe").load(_run(  # noqa: E731
        ["git", "show", f"refs/exps/{_exp_ref(project, name)}:dvc.lock"], project))
    again, first = lock("low-lr-again"), lock("low-lr")
    for stage in ("train", "align", "evaluate", "merge", "quantize"):
        assert again["stages"][stage]["outs"] == first["stages"][stage]["outs"], stage
    assert seconds < 60, f"{seconds:.0f} s"
    _run(["git", "reset", "-q", "--hard"], project)
    _dvc(project, "checkout", "--force")


def _exp_ref(project: Path, name: str) -> str:
    """The path under refs/exps/ of experiment ``name``."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], project).split()
    return next(r.removeprefix("refs/exps/") for r in refs if r.endswith("/" + name))


def test_killed_dvc_repro_resumes_training_and_keeps_its_curves(project: Path) -> None:
    """SIGKILL `dvc repro` mid-training; the next `dvc repro` resumes from the checkpoint."""
    yaml = YAML()
    params = yaml.load((project / "params.yaml").read_text())
    # a param change that reruns train, with the same 46 steps (val loss improves at every
    # evaluation here, so patience 4 never stopped it either), killed at step 10
    params["train"]["patience"] = 5
    with (project / "params.yaml").open("w") as fh:
        yaml.dump(params, fh)
    saved = project / "models" / "checkpoints" / "checkpoint-10" / "reprotune_counters.json"
    first = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "train"],
                             cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not saved.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training finished before it was killed"

    out = _dvc(project, "repro", "train")
    assert "resuming from checkpoint" in out
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["resumed_from_step"] >= 10
    assert train["train_steps"] > train["resumed_from_step"] + 10  # it trained on after resuming
    # the curves from before the kill came back from the checkpoint's copy (DVC deleted
    # them before the rerun), without repeats
    tsv = (project / "metrics/curves/plots/metrics/val_loss.tsv").read_text().splitlines()[1:]
    steps = [int(line.split("\t")[0]) for line in tsv]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == train["train_steps"]
    assert steps[:3] == [0, 5, 10]

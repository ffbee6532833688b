"""Data mixtures (issue 32): params, the per-task tagging at ingest, the split stratified by
task, and the weighted train sampling (reprotune.data.mixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data import mixture
from reprotune.data.split import SplitError, split_rows
from reprotune.params import IngestParams, ParamsError, build, read_params

A, B = "data/raw/a.jsonl", "data/raw/b.jsonl"


def _ingest(**mix: object) -> dict:
    tasks = {"en": {"inputs": [A], "weight": 2}, "zh": {"inputs": [B]}}
    return {"inputs": [A, B], "mixture": {"strategy": "interleave", "tasks": tasks, **mix}}


def test_mixture_params_parse_with_defaults() -> None:
    cfg = build(IngestParams, _ingest(), "ingest")
    assert cfg.mixture.strategy == "interleave" and cfg.mixture.seed == 0
    assert {n: (t.inputs, t.weight) for n, t in cfg.mixture.tasks.items()} == {
        "en": ([A], 2.0), "zh": ([B], 1.0)}
    assert mixture.input_tasks(cfg.mixture.tasks) == {A: "en", B: "zh"}
    assert build(IngestParams, {}, "ingest").mixture.tasks == {}  # the default: no mixture


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["tasks"]["en"].update(weight=0), "ingest.mixture.tasks.en.weight: 0.0 must be > 0"),
    (lambda d: d["tasks"]["zh"].update(weight=-1.5), "ingest.mixture.tasks.zh.weight: -1.5 must be > 0"),
    (lambda d: d["tasks"]["en"].update(inputs=["data/raw/c.jsonl"]),
     "ingest.mixture.tasks.en.inputs[0]: 'data/raw/c.jsonl' is not in ingest.inputs"),
    (lambda d: d["tasks"]["en"].update(inputs=[]), "ingest.mixture.tasks.en.inputs: lists no file"),
    (lambda d: d["tasks"]["zh"].update(inputs=[A]),
     "ingest.mixture.tasks.zh.inputs[0]: 'data/raw/a.jsonl' already belongs to task 'en'"),
    (lambda d: d["tasks"].pop("zh"), "ingest.inputs[1]: 'data/raw/b.jsonl' is in no task"),
    (lambda d: d.update(strategy="mix"), "ingest.mixture.strategy: 'mix' is not one of"),
    (lambda d: d["tasks"]["en"].update(wieght=1), "ingest.mixture.tasks.en.wieght: unknown key"),
    (lambda d: d["tasks"].update({"a.b": {"inputs": [A]}}), "ingest.mixture.tasks.a.b: a task name"),
])
def test_mixture_params_errors_name_the_key(change, message: str) -> None:
    raw = _ingest()
    change(raw["mixture"])
    with pytest.raises(ParamsError) as err:
        build(IngestParams, raw, "ingest")
    assert str(err.value).startswith(message), err.value
    assert "\n" not in str(err.value)


def test_check_refuses_a_non_positive_weight_in_the_file(tmp_path: Path, repo_root: Path) -> None:
    text = (repo_root / "params.yaml").read_text(encoding="utf-8").replace(
        "    tasks: {}", "    tasks: {demo: {inputs: [data/raw/demo.jsonl], weight: 0}}")
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match=r"ingest\.mixture\.tasks\.demo\.weight: 0\.0 must be > 0"):
        read_params(tmp_path / "params.yaml")


# --------------------------------------------------------------------------- ingest
def test_tag_part_adds_the_task_and_keeps_every_byte_of_the_rest(tmp_path: Path) -> None:
    recs = [{"source": "a:1", "id": "x", "messages": [{"role": "user", "content": "计算，12 加 7 "},
                                                      {"role": "assistant", "content": "19\t"}],
             "tools": None, "label": "1.50", "group": None, "meta": {"f": 1.5e-07}}]
    io.write_jsonl(tmp_path / "r.jsonl", recs)
    with (tmp_path / "out.jsonl").open("wb") as fh:
        assert mixture.tag_part(tmp_path / "r.jsonl", fh, "zh") == 1
    line = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    original = (tmp_path / "r.jsonl").read_text(encoding="utf-8")
    assert line == original[:-2] + ', "task": "zh"}\n'


def test_task_counts_add_up_and_a_task_without_rows_is_refused() -> None:
    files = {A: {"rows_in": 10, "kept": 8}, B: {"rows_in": 5, "kept": 0}}
    tasks = build(IngestParams, _ingest(), "ingest").mixture.tasks
    counts = mixture.task_counts(files, tasks)
    assert counts == {"en": {"inputs": [A], "rows_in": 10, "kept": 8, "rejected_total": 2},
                      "zh": {"inputs": [B], "rows_in": 5, "kept": 0, "rejected_total": 5}}
    with pytest.raises(mixture.MixtureError, match=r"^ingest\.mixture\.tasks\.zh: its inputs "):
        mixture.check_task_rows(counts)


# --------------------------------------------------------------------------- split
def _rows(n_en: int, n_zh: int, labels: bool = False) -> list[dict]:
    rows = [{"id": f"en{i}", "task": "en", "label": f"l{i % 2}" if labels else None,
             "messages": json.dumps([{"role": "user", "content": f"english question {i} {i * 7919 % 997}"},
                                     {"role": "assistant", "content": f"answer {i * 104729 % 99991}"}])}
            for i in range(n_en)]
    rows += [{"id": f"zh{i}", "task": "zh", "label": f"l{i % 2}" if labels else None,
              "messages": json.dumps([{"role": "user", "content": f"中文问题 {i} {i * 7919 % 997}"},
                                      {"role": "assistant", "content": f"答案 {i * 104729 % 99991}"}])}
             for i in range(n_zh)]
    return rows


@pytest.mark.parametrize("stratify", [None, "label"])
def test_split_keeps_every_task_in_every_part(stratify: str | None) -> None:
    # 190 English rows and 20 Chinese ones: unstratified, the 20 would land by chance
    res = split_rows(_rows(190, 20, labels=True), val_ratio=0.1, test_ratio=0.1,
                     stratify=stratify, group=None, seed=0, leakage_threshold=0.99,
                     on_leak="report")
    tasks = res.metrics["tasks"]
    en = 19 if stratify is None else 20  # by label: two strata of 95, each round(9.5) = 10
    assert tasks == {"train": {"en": 190 - 2 * en, "zh": 16}, "val": {"en": en, "zh": 2},
                     "test": {"en": en, "zh": 2}}
    assert {s: sum(v.values()) for s, v in tasks.items()} == res.metrics["counts"]


def test_split_without_tasks_is_unchanged() -> None:
    rows = [{k: v for k, v in r.items() if k != "task"} for r in _rows(100, 20, labels=True)]
    res = split_rows(rows, val_ratio=0.1, test_ratio=0.1, stratify="label", group=None, seed=0,
                     leakage_threshold=0.99, on_leak="report")
    assert "tasks" not in res.metrics
    # the same assignment as before tasks existed: strata are the labels alone
    plain = split_rows(rows, val_ratio=0.1, test_ratio=0.1, stratify="label", group=None, seed=0,
                       leakage_threshold=0.99, on_leak="report", task=None)
    assert res.indices == plain.indices and res.metrics == plain.metrics


def test_split_refuses_a_task_too_small_for_a_part() -> None:
    with pytest.raises(SplitError, match=r"^ingest\.mixture\.tasks\.zh: no (val|test) rows"):
        split_rows(_rows(100, 3), val_ratio=0.1, test_ratio=0.1, stratify=None, group=None,
                   seed=0, leakage_threshold=0.99, on_leak="report")


# --------------------------------------------------------------------------- sampling
def test_targets_follow_the_weights_and_keep_the_total() -> None:
    assert mixture.targets({"en": 80, "zh": 20}, {"en": 1.0, "zh": 1.0}) == {"en": 50, "zh": 50}
    assert mixture.targets({"en": 80, "zh": 20}, {"en": 1.0, "zh": 3.0}) == {"en": 25, "zh": 75}
    # 100 / 3 each: the one left over goes to the first task name
    assert mixture.targets({"b": 50, "a": 25, "c": 25}, {"a": 1, "b": 1, "c": 1}) == {
        "a": 34, "b": 33, "c": 33}


def test_interleave_counts_per_task_are_exact_and_seeded() -> None:
    tasks = ["en"] * 80 + ["zh"] * 20
    order, counts = mixture.sample_order(tasks, {"en": 1.0, "zh": 1.5}, strategy="interleave",
                                         seed=7)
    assert len(order) == 100
    assert counts == {
        "en": {"weight": 1.0, "rows": 80, "sampled": 40, "repeated": 0, "left_out": 40, "share": 0.4},
        "zh": {"weight": 1.5, "rows": 20, "sampled": 60, "repeated": 40, "left_out": 0, "share": 0.6}}
    for c in counts.values():
        assert c["sampled"] == c["rows"] - c["left_out"] + c["repeated"]
    picked = Counter(order)
    en = [i for i in picked if tasks[i] == "en"]
    zh = [i for i in range(80, 100)]
    assert len(en) == 40 and all(picked[i] == 1 for i in en)       # undersampled: distinct
    assert all(picked[i] == 3 for i in zh)                         # 60 = every row 3 times
    # interleaved: every stretch of 10 rows holds the tasks 4:6
    for start in range(0, 100, 10):
        assert Counter(tasks[i] for i in order[start:start + 10]) == {"en": 4, "zh": 6}
    again, _ = mixture.sample_order(tasks, {"en": 1.0, "zh": 1.5}, strategy="interleave", seed=7)
    other, _ = mixture.sample_order(tasks, {"en": 1.0, "zh": 1.5}, strategy="interleave", seed=8)
    assert again == order and other != order


def test_oversampling_a_remainder_takes_distinct_rows() -> None:
    tasks = ["a"] * 10 + ["b"] * 3
    order, counts = mixture.sample_order(tasks, {"a": 1.0, "b": 1.0}, strategy="interleave", seed=0)
    assert counts["b"]["sampled"] == 6 and counts["a"]["sampled"] == 7
    assert sorted(Counter(i for i in order if tasks[i] == "b").values()) == [2, 2, 2]
    assert sorted(Counter(i for i in order if tasks[i] == "a").values()) == [1] * 7


def test_concat_is_the_identity() -> None:
    tasks = ["en", "zh", "en", "en"]
    order, counts = mixture.sample_order(tasks, {"en": 5.0, "zh": 1.0}, strategy="concat", seed=3)
    assert order == [0, 1, 2, 3]
    assert counts["en"] == {"weight": 5.0, "rows": 3, "sampled": 3, "repeated": 0, "left_out": 0,
                            "share": 0.75}


def test_sampling_refuses_rows_without_a_task_and_tasks_without_rows() -> None:
    with pytest.raises(mixture.MixtureError, match="carry no task"):
        mixture.sample_order(["en", None], {"en": 1.0}, strategy="interleave", seed=0)
    with pytest.raises(mixture.MixtureError, match=r"^ingest\.mixture\.tasks\.zh: no train rows"):
        mixture.sample_order(["en"], {"en": 1.0, "zh": 1.0}, strategy="interleave", seed=0)


def test_write_lines_copies_the_sampled_lines_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "train.jsonl"
    src.write_bytes(b'{"a": "\xef\xbc\x8c"}\n\n{"b": 2}\n{"c": 3}')
    assert mixture.write_lines(src, [2, 0, 2], tmp_path / "out.jsonl") == 3
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"c": 3}\n{"a": "\xef\xbc\x8c"}\n{"c": 3}\n'


# --------------------------------------------------------------------------- stages
def _stage(project: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "stages" / script), *args], cwd=project,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root / "src")})


def test_check_stage_refuses_a_non_positive_weight_naming_the_key(tmp_path: Path) -> None:
    io.write_jsonl(tmp_path / A, [{"instruction": "q", "output": "a"}])
    (tmp_path / "params.yaml").write_text(
        f"ingest:\n  inputs: [{A}]\n  mixture:\n    tasks: {{en: {{inputs: [{A}], weight: -2}}}}\n",
        encoding="utf-8")
    proc = _stage(tmp_path, "check.py", "--out", "ok.json")
    assert proc.returncode != 0 and not (tmp_path / "ok.json").exists()
    assert "ingest.mixture.tasks.en.weight: -2.0 must be > 0" in proc.stderr.strip().splitlines()[-1]


def test_ingest_stage_refuses_a_task_whose_inputs_kept_no_row(tmp_path: Path) -> None:
    io.write_jsonl(tmp_path / A, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)])
    io.write_jsonl(tmp_path / B, [{"question": "no known format"}] * 2)
    (tmp_path / "params.yaml").write_text(
        f"ingest:\n  inputs: [{A}, {B}]\n  min_kept_ratio: 0\n  mixture:\n    tasks:\n"
        f"      en: {{inputs: [{A}]}}\n      zh: {{inputs: [{B}]}}\n", encoding="utf-8")
    for path in (A, B):
        proc = _stage(tmp_path, "read.py", "--input", path, "--out", f"data/interim/read/{path}")
        assert proc.returncode == 0, proc.stderr
    proc = _stage(tmp_path, "ingest.py")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"ingest: ingest.mixture.tasks.zh: its inputs ({B}) kept no row of 2")

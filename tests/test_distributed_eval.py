"""Data-parallel evaluation: eval.num_processes > 1 gives exactly the one-process results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reprotune import io

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # three stage runs, two of them as two processes: ~40 s

RECORDS = [
    {"id": f"r{i}", "source": f"t:{i}", "label": None, "group": None, "tools": None,
     "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (q, a) in enumerate([
        ("What is 12 plus 7?", "19"), ("计算 12 加 7", "19。"), ("Translate 'apple'", "苹果"),
        ("Say hello", "Hello!"), ("Count to three", "one two three"),
        ("这部电影怎么样？", "很好看。"), ("Name a colour", "blue"), ("2 + 2?", "4"),
        ("Capital of France?", "Paris"), ("Say bye", "Bye!")])]


def _stage(cwd: Path, processes: int, do_sample: bool) -> subprocess.CompletedProcess:
    yaml = YAML(typ="safe", pure=True)
    params = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["eval"].update(num_processes=processes, batch_size=3, max_new_tokens=6,
                          do_sample=do_sample)
    with (cwd / "params.yaml").open("w", encoding="utf-8") as fh:
        yaml.dump(params, fh)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "--kind", "base",
                           "--model", "models/base", "--seed", "3"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_one_process_results(tmp_path: Path, tiny_base_dir: Path) -> None:
    from reprotune.data.formatting import format_records, formatted_schema
    from reprotune.modeling import load_tokenizer

    rows, _, _ = format_records(RECORDS, load_tokenizer(tiny_base_dir), max_length=256,
                                enable_thinking=False)
    results = {}
    for processes, do_sample in ((1, True), (2, True), (2, False)):
        work = tmp_path / f"p{processes}{do_sample}"
        shutil.copytree(tiny_base_dir, work / "models" / "base")
        (work / "data").mkdir(parents=True, exist_ok=True)
        (work / "data" / "reference").symlink_to(ROOT / "data" / "reference")  # eval.general_text
        io.write_parquet(work / "data/processed/test.parquet", rows, schema=formatted_schema())
        proc = _stage(work, processes, do_sample)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[processes, do_sample] = (
            io.read_jsonl(work / "data/eval/predictions_base.jsonl"),
            io.read_json(work / "metrics/eval_base.json"))
    one, two = results[1, True], results[2, True]
    assert [p["prediction"] for p in one[0]] == [p["prediction"] for p in two[0]]
    assert one == two  # predictions and every metric, byte for byte
    assert len(one[0]) == len(RECORDS) and any(p["prediction"] for p in one[0])
    greedy = results[2, False][0]
    assert [p["prediction"] for p in greedy] != [p["prediction"] for p in one[0]]  # it sampled


def test_more_processes_than_cores_is_refused(tmp_path: Path, tiny_base_dir: Path) -> None:
    proc = _stage(tmp_path, 64, False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "evaluate: eval.num_processes: 64 processes, but this machine has")

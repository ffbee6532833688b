"""Params naming files or folders are checked for existence by the check stage (before DVC
deletes anything), and NaN is refused like an out-of-range number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reprotune.params import ParamsError, check_paths, load_top, read_params

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, text: str) -> Path:
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "lr: nan is not a number (NaN); give a finite value"),
    ("lr: nan\n", "lr: 'nan' is not a number (NaN); give a finite value"),  # -S lr=nan
    ("epochs: .NaN\n", "epochs: nan is not a number (NaN)"),  # no upper bound to catch it
    ("dedup:\n  threshold: .nan\n", "dedup.threshold: nan is not a number (NaN)"),
    ("lr: .inf\n", "lr: inf must be <= 1"),
])
def test_nan_is_refused_like_infinity(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ParamsError) as exc:
        read_params(_project(tmp_path, text) / "params.yaml")
    assert str(exc.value).startswith(message)


def test_finite_numbers_still_pass(tmp_path: Path) -> None:
    assert load_top(_project(tmp_path, "lr: 2e-05\nepochs: '3'\n") / "params.yaml").epochs == 3.0


@pytest.mark.parametrize("text, message", [
    ("model:\n  name: ../../no_such_dir\n", "model.name: '../../no_such_dir': no such local folder"),
    ("model:\n  name: models/nowhere/qwen\n", "model.name: 'models/nowhere/qwen': no such local"),
    ("model:\n  name: ./Qwen3-0.6B\n", "model.name: './Qwen3-0.6B': no such local folder"),
    ("model:\n  name: empty_dir\n", "model.name: 'empty_dir' is a folder without config.json"),
    ("ingest:\n  inputs: [data/raw/mine.jsonl]\n",
     "ingest.inputs[0]: 'data/raw/mine.jsonl': no such file"),
    ("ingest:\n  inputs: [data/raw/demo.jsonl, data/raw]\n",
     "ingest.inputs[1]: 'data/raw' is a folder; list the files in it"),
    ("train:\n  launcher: accelerate\n  num_processes: 2\n  accelerate_config: configs/x.yaml\n",
     "train.accelerate_config: 'configs/x.yaml': no such file; use one of configs/accelerate/ddp.yaml"),
])
def test_missing_paths_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "configs" / "accelerate").mkdir(parents=True)
    (tmp_path / "configs" / "accelerate" / "ddp.yaml").write_text("num_processes: 2\n")
    raw = read_params(_project(tmp_path, text) / "params.yaml")
    with pytest.raises(ParamsError) as exc:
        check_paths(raw, tmp_path)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_existing_paths_and_hub_ids_pass(tmp_path: Path) -> None:
    model = tmp_path / "models" / "mine"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("instruction,output\nq,a\n")
    for name in ("tiny", "Qwen/Qwen3-0.6B", "models/mine", str(model)):
        text = f"model:\n  name: {name}\ningest:\n  inputs: [data/raw/demo.jsonl, data/a.csv]\n"
        check_paths(read_params(_project(tmp_path, text) / "params.yaml"), tmp_path)


def test_check_stage_stops_before_anything_is_written(tmp_path: Path) -> None:
    """As `dvc repro` runs it: exit 1, one line naming the key, no traceback, no output."""
    _project(tmp_path, "model:\n  name: ../../no_such_dir\n")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "check.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("check: params.yaml: model.name: '../../no_such_dir': no such "
                                   "local folder (paths are relative to the repository root); fix "
                                   "the path, or use a hub id like Qwen/Qwen3-0.6B, a .gguf file, "
                                   "a preset (smollm2-135m-instruct), or tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    proc = subprocess.run([sys.executable, "-m", "reprotune.params"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "model.name: '../../no_such_dir'" in proc.stderr


def test_repo_params_pass_the_path_check() -> None:
    check_paths(read_params(ROOT / "params.yaml"), ROOT)

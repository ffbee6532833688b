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


# ---------------------------------------------------------------- issue 28 (hostile round 3)
def _check_cli(params: Path) -> subprocess.CompletedProcess:
    """`make check` as the Makefile runs it: python -m reprotune.params [file]."""
    return subprocess.run([sys.executable, "-m", "reprotune.params", str(params)],
                          capture_output=True, text=True, timeout=120)


def test_params_dvc_cannot_read_are_refused_before_dvc(tmp_path: Path) -> None:
    """An empty params.yaml, or one missing a key dvc.yaml names, passes reprotune's defaults
    but fails inside `dvc repro`: `make check` (which `make repro` runs first) refuses it."""
    (tmp_path / "data" / "raw").mkdir(parents=True)
    for name in ("dvc.yaml", "data/raw/dvc.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    shipped = (ROOT / "params.yaml").read_text(encoding="utf-8")
    import re

    for text, line in [
        ("", r"the file is empty, but dvc.yaml has DVC read \d+ keys from it \(ingest.format, "),
        (shipped.replace("\nseed:", "\n# seed:"), "seed: missing, and dvc.yaml's stage train "),
    ]:
        proc = _check_cli(_project(tmp_path, text) / "params.yaml")
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1
        assert re.match(re.escape(f"{tmp_path / 'params.yaml'}: ") + line, proc.stderr)
    assert _check_cli(_project(tmp_path, shipped) / "params.yaml").returncode == 0


def test_duplicates_and_alias_bombs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"^quantize.methods\[2\]: 'int8_dynamic' is listed "
                                          r"twice \(also quantize.methods\[0\]\); list each"):
        read_params(_project(tmp_path, "quantize:\n  methods: [int8_dynamic, gguf_f16, "
                                       "int8_dynamic]\n") / "params.yaml")
    # the billion-laughs YAML that hangs DVC's params loader, hidden under a known key
    bomb = ["seed: 0", "demo:", "  a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    import time

    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match="expand to more than 100,000 values .an alias bomb.: "
                                          "DVC would hang"):
        read_params(_project(tmp_path, "\n".join(bomb) + "\n") / "params.yaml")
    assert time.perf_counter() - t0 < 5
    # aliases that expand to a few values stay fine
    assert read_params(_project(tmp_path, "lr: &x 0.001\nlora:\n  dropout: *x\n")
                       / "params.yaml")["lora"]["dropout"] == 0.001


def test_local_model_with_own_code_or_pickles_is_refused_with_a_fix(tmp_path: Path,
                                                                     tiny_base_dir: Path) -> None:
    import json
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(tiny_base_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="mymodel", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                               "AutoModelForCausalLM": "modeling_my.MyLM"})
    (remote / "config.json").write_text(json.dumps(cfg))
    raw = read_params(_project(tmp_path, "model:\n  name: remote\n") / "params.yaml")
    with pytest.raises(ParamsError, match=r"^model.name: 'remote' ships its own code "
                                          r"\(configuration_my.py, modeling_my.py, named by "
                                          r"config.json auto_map\) for model_type 'mymodel'"):
        check_paths(raw, tmp_path)
    check_paths(read_params(_project(tmp_path, "model:\n  name: remote\n  trust_remote_code: "
                                               "true\n") / "params.yaml"), tmp_path)
    from reprotune.modeling import BaseModelUnavailable, prepare_base
    from reprotune.params import TinyModelParams

    with pytest.raises(BaseModelUnavailable, match="ships its own code"):  # the base stage
        prepare_base(str(remote), tmp_path / "base", [], TinyModelParams(), 0)
    # pickle-only weights: refused, and the conversion the message gives makes a loadable folder
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_base_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    raw = read_params(_project(tmp_path, f"model:\n  name: {pickled}\n") / "params.yaml")
    with pytest.raises(ParamsError) as exc:
        check_paths(raw, tmp_path)
    msg = str(exc.value)
    assert "holds its weights only as pickles (pytorch_model.bin), which reprotune never " \
           "loads" in msg and "\n" not in msg
    exec(msg.split('python -c "')[1].split('" and set')[0])  # the fix, as given
    converted = f"{pickled}-safetensors"
    assert msg.endswith(f"set model.name: {converted}")
    check_paths(read_params(_project(tmp_path, f"model:\n  name: {converted}\n")
                            / "params.yaml"), tmp_path)


def test_pickled_finetuned_folder_stops_merge_in_one_line(tmp_path: Path,
                                                          tiny_base_dir: Path) -> None:
    """A models/finetuned holding only pytorch_model.bin is never unpickled, and the stage
    says so in one line (no traceback above it)."""
    import json
    import shutil

    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    finetuned = tmp_path / "models" / "finetuned"
    shutil.copytree(tiny_base_dir, finetuned)
    torch.save(load_file(finetuned / "model.safetensors"), finetuned / "pytorch_model.bin")
    (finetuned / "model.safetensors").unlink()
    from reprotune.chat_template import template_fingerprint

    template = (finetuned / "chat_template.jinja").read_text(encoding="utf-8")
    (finetuned / "reprotune_train.json").write_text(json.dumps({
        "method": "full", "kind": "full", "base_dir": str(tiny_base_dir),
        "enable_thinking": False, "chat_template_sha256": template_fingerprint(template)}))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "merge.py"), "--finetuned",
                           "models/finetuned", "--out", "models/merged"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "merge: models/finetuned: no .safetensors weights (pickled weights are not loaded); "
        "rerun the train stage")
    assert not (tmp_path / "models" / "merged").exists()

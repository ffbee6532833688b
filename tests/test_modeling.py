"""Embedded tiny base model and offline-safe loading of real base models."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reprotune.chat_template import qwen3_template, template_fingerprint
from reprotune.modeling import (
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
    BaseModelUnavailable,
    create_tiny_base,
    hub_reachable,
    load_model,
    load_tokenizer,
    prepare_base,
)
from reprotune.params import TinyModelParams

SMALL = TinyModelParams(vocab=320, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8,
                        intermediate=32, max_positions=64)
TEXTS = ["hello world, hello tokenizer", "你好，世界。你好！", "12 + 7 = 19"] * 3


def test_tiny_base_files_and_config(tiny_base_dir):
    names = {p.name for p in tiny_base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja", "reprotune_base.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    tok = load_tokenizer(tiny_base_dir)
    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"],
            cfg["max_position_embeddings"]) == (64, 2, 4, 2, 16, 128, 512)
    assert cfg["vocab_size"] == len(tok) <= 512
    assert cfg["tie_word_embeddings"] is True
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (im_end, eot)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = json.loads((tiny_base_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [im_end, eot]
    info = json.loads((tiny_base_dir / "reprotune_base.json").read_text())
    assert info["name"] == "tiny" and info["source"] == "embedded"
    assert info["params"]["vocab"] == 512 and info["params"]["layers"] == 2
    assert info["chat_template_sha256"] == template_fingerprint(qwen3_template())


def test_special_and_markup_tokens_are_single_tokens(tiny_base_dir):
    tok = load_tokenizer(tiny_base_dir)
    for t in SPECIAL_TOKENS + MARKUP_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    # like Qwen3: control tokens vanish with skip_special_tokens, markup tokens stay visible
    ids = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>",
                     add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\n\n</think>\n\nok"


@pytest.mark.parametrize("text", [
    "计算 12 加 7 等于多少？答案是 19。",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻",
    "unseen scripts: Ωμέγα кириллица العربية ひらがな 한국어",
    "bytes \x00\x01\t\r\n\u200b end",
    "  leading and trailing spaces  ",
])
def test_tokenizer_round_trips_any_text(tiny_base_dir, text):
    tok = load_tokenizer(tiny_base_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None  # byte-level: nothing is ever unknown


def test_create_tiny_base_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        create_tiny_base(tmp_path / name, TEXTS, SMALL, seed=seed)
    a, b, c = (tmp_path / n for n in "abc")
    for f in ("tokenizer.json", "config.json", "model.safetensors", "reprotune_base.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_create_tiny_base_leaves_global_rng_alone(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_tiny_base(tmp_path / "m", TEXTS, SMALL, seed=0)
    assert torch.equal(torch.rand(3), expected)


# Builds the default-shaped tiny base in a fresh interpreter limited to argv[2] threads
# (torch intra-op, OpenMP and the tokenizers trainer's rayon pool alike).
_BUILD_WITH_THREADS = """
import sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from reprotune.modeling import create_tiny_base
from reprotune.params import TinyModelParams
texts = [f"row {i}: what is {i} plus 7? {i + 7}. 计算 {i} 加 7 等于 {i + 7}。" for i in range(400)]
create_tiny_base(sys.argv[1], texts, TinyModelParams(vocab=600, hidden=128, layers=2, heads=4,
                 kv_heads=2, head_dim=32, intermediate=384, max_positions=256), seed=0)
assert torch.get_num_threads() == int(sys.argv[2])
"""


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_base_is_byte_identical_with_1_and_2_threads(tmp_path):
    """The embedded base must hash the same on every machine: thread count must not matter."""
    hashes = {}
    for n in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n),
                   RAYON_NUM_THREADS=str(n), TOKENIZERS_PARALLELISM="true")
        out = tmp_path / f"threads{n}"
        subprocess.run([sys.executable, "-c", _BUILD_WITH_THREADS, str(out), str(n)],
                       env=env, check=True, capture_output=True, timeout=300)
        hashes[n] = _file_hashes(out)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(hashes[1])
    assert hashes[1] == hashes[2]


def test_create_tiny_base_rejects_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        create_tiny_base(tmp_path / "m", ["", ""], SMALL, seed=0)
    assert not (tmp_path / "m").exists()


def test_tiny_model_forward_and_backward(tiny_base_dir):
    import torch

    tok = load_tokenizer(tiny_base_dir)
    model = load_model(tiny_base_dir)
    assert model.dtype == torch.float32
    text = tok.apply_chat_template([{"role": "user", "content": "计算 12 加 7"},
                                    {"role": "assistant", "content": "19"}], tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    # a random init predicts roughly uniformly: loss close to ln(vocab)
    assert abs(out.loss.item() - math.log(len(tok))) < 1.0
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_prepare_base_tiny_and_local_dir(tmp_path, tiny_base_dir):
    import torch
    from safetensors.torch import load_file

    info = prepare_base("tiny", tmp_path / "tiny", TEXTS, SMALL, seed=1)
    assert info["source"] == "embedded" and (tmp_path / "tiny" / "model.safetensors").is_file()

    # the real-model path, fed from a local directory
    info = prepare_base(str(tiny_base_dir), tmp_path / "copy", [], SMALL, seed=0)
    assert info["source"] == "local" and info["name"] == str(tiny_base_dir)
    assert info["chat_template_sha256"] == template_fingerprint(qwen3_template())
    copy = tmp_path / "copy"
    assert json.loads((copy / "reprotune_base.json").read_text()) == info
    src_w, dst_w = load_file(tiny_base_dir / "model.safetensors"), load_file(copy / "model.safetensors")
    assert src_w.keys() == dst_w.keys()
    assert all(torch.equal(src_w[k], dst_w[k]) for k in src_w)
    tok_src, tok_dst = load_tokenizer(tiny_base_dir), load_tokenizer(copy)
    assert tok_dst.chat_template == qwen3_template()
    s = "<|im_start|>user\n你好 🙂<|im_end|>"
    assert tok_src.encode(s) == tok_dst.encode(s)


def test_prepare_base_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    start = time.monotonic()
    with pytest.raises(BaseModelUnavailable) as err:
        prepare_base("reprotune-test/no-such-model", tmp_path / "out", [], SMALL, seed=0)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "model.name='reprotune-test/no-such-model'" in msg
    assert "hf download reprotune-test/no-such-model" in msg and "local model directory" in msg
    assert not (tmp_path / "out").exists()


def test_prepare_base_missing_local_path(tmp_path):
    with pytest.raises(BaseModelUnavailable, match="no such local directory"):
        prepare_base(str(tmp_path / "nope"), tmp_path / "out", [], SMALL, seed=0)

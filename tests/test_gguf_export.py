"""GGUF export: metadata, tensor names/shapes/types, and a transformers GGUF round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from reprotune.deploy.gguf_export import (  # noqa: E402
    GGUF_FILE,
    GGUFUnsupported,
    export_gguf,
    load_exported,
    read_gguf_summary,
    rope_permute,
)

KEEP = ["embed_tokens", "lm_head"]
PER_LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
             "attn_k_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def _greedy(model, ids: list[int], n: int = 6) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def exported(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gguf")
    info = {}
    for q in ("f16", "q8_0"):
        info[q] = export_gguf(tiny_base_dir, out / q / GGUF_FILE, qtype=q, keep_full_precision=KEEP,
                              enable_thinking=False, chat_template_sha256="abc123")
        info[q]["path"] = out / q / GGUF_FILE
    return info


def test_metadata_and_tensors(exported: dict, tiny_base_dir: Path) -> None:
    model, tok = _hf(tiny_base_dir)
    cfg = model.config
    for q, expected_2d in (("f16", "F16"), ("q8_0", "Q8_0")):
        s = read_gguf_summary(exported[q]["path"])
        assert s["architecture"] == "qwen3"
        assert s["block_count"] == cfg.num_hidden_layers == 2
        assert s["key_length"] == cfg.head_dim == 16
        assert s["chat_template"] == tok.chat_template
        assert s["enable_thinking"] is False and s["chat_template_sha256"] == "abc123"
        assert s["n_vocab"] == cfg.vocab_size
        names = {f"blk.{i}.{p}.weight" for i in range(2) for p in PER_LAYER}
        # tied embeddings: no separate `output` tensor
        assert set(s["tensors"]) == names | {"token_embd.weight", "output_norm.weight"}
        assert exported[q]["n_tensors"] == len(names) + 2 == 24
        sd = model.state_dict()
        assert s["tensors"]["token_embd.weight"]["shape"] == list(sd["model.embed_tokens.weight"].shape)
        assert s["tensors"]["blk.1.attn_k.weight"]["shape"] == list(
            sd["model.layers.1.self_attn.k_proj.weight"].shape)
        assert s["tensors"]["blk.0.attn_q_norm.weight"]["type"] == "F32"
        assert s["tensors"]["blk.0.ffn_down.weight"]["type"] == expected_2d
        # kept in higher precision in both files
        assert s["tensors"]["token_embd.weight"]["type"] == "F16"
    q8 = exported["q8_0"]
    assert q8["tensor_types"] == {"F16": 1, "F32": 9, "Q8_0": 14}
    assert len(q8["layer_errors"]) == 14 and max(q8["layer_errors"].values()) < 0.01
    assert exported["f16"]["layer_errors"] == {}


def test_tokenizer_metadata(exported: dict, tiny_base_dir: Path) -> None:
    reader = gguf.GGUFReader(str(exported["f16"]["path"]))
    _, tok = _hf(tiny_base_dir)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tok.eos_token_id
    assert reader.get_field("tokenizer.ggml.padding_token_id").contents() == tok.pad_token_id
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    think = tok.convert_tokens_to_ids("<think>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == gguf.TokenType.CONTROL
    assert tokens[think] == "<think>" and types[think] == gguf.TokenType.USER_DEFINED
    assert len(reader.get_field("tokenizer.ggml.merges").contents()) > 0


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_transformers_roundtrip_same_greedy_tokens(exported: dict, tiny_base_dir: Path,
                                                   qtype: str) -> None:
    model, tok = _hf(tiny_base_dir)
    g_model, g_tok = load_exported(exported[qtype]["path"])
    assert g_model.config.head_dim == 16  # read from qwen3.attention.key_length
    assert g_tok.chat_template == tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7? 计算"}],
                                   tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert g_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.inference_mode():
        diff = (model(torch.tensor([ids])).logits - g_model(torch.tensor([ids])).logits).abs().max()
    assert float(diff) < (5e-3 if qtype == "f16" else 5e-2)
    assert _greedy(g_model, ids) == _greedy(model, ids)


def test_a_load_parses_the_file_once_and_gives_the_same_model(exported: dict,
                                                             monkeypatch) -> None:
    """transformers' tokenizer, config and weights loaders each open their own GGUFReader,
    and the header check one more: under ``parsed_once`` the file is parsed once, the tensor
    name map built once, and the model equals one loaded without it."""
    from reprotune.gguf_import import inspect_gguf, load_gguf

    parses: list[str] = []
    maps: list[int] = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parses.append(str(path))
            super().__init__(path, mode)

    def counting_map(arch, n_blocks):
        maps.append(n_blocks)
        return gguf.tensor_mapping.TensorNameMap(arch, n_blocks)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    path = exported["q8_0"]["path"]
    plain_tok, plain = load_gguf(path, inspect_gguf(path))
    assert len(parses) == 4 and len(maps) > 2  # the header check + three transformers loaders
    parses.clear(), maps.clear()
    model, tok = load_exported(path)
    assert parses == [str(path)] and maps == [2]
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is counting_map
    same, other = model.state_dict(), plain.state_dict()
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)
    assert tok.backend_tokenizer.to_str() == plain_tok.backend_tokenizer.to_str()


def test_untied_model_writes_output_tensor(tiny_base_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_base_dir)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    src = tmp_path / "untied"
    model.save_pretrained(src)
    for f in tiny_base_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(f, src / f.name)
    out = tmp_path / GGUF_FILE
    export_gguf(src, out, qtype="q8_0", keep_full_precision=[], enable_thinking=True,
                chat_template_sha256="x")
    s = read_gguf_summary(out)
    assert s["tensors"]["output.weight"]["shape"] == [cfg.vocab_size, cfg.hidden_size]
    assert s["tensors"]["token_embd.weight"]["type"] == "Q8_0"  # nothing kept this time
    assert s["enable_thinking"] is True
    g_model, _ = load_exported(out)
    assert g_model.config.tie_word_embeddings is False
    ids = [100, 101, 102, 103]  # ordinary tokens (ids below 26 are the added tokens)
    assert _greedy(g_model, ids, 4) == _greedy(model.eval(), ids, 4)


def test_other_architectures_are_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(GGUFUnsupported) as exc:
        export_gguf(tmp_path, tmp_path / GGUF_FILE, qtype="f16", keep_full_precision=[],
                    enable_thinking=False, chat_template_sha256="x")
    assert str(exc.value) == "GGUF export supports model_type 'qwen3' or 'llama' only, got 'qwen2'"
    assert not (tmp_path / GGUF_FILE).exists()


def test_rope_permute_interleaves_the_halves_of_each_head() -> None:
    """HF rotate-half rows (x0..x3 | y0..y3 per head) -> ggml's pairs (x0 y0 x1 y1 ...)."""
    w = torch.arange(2 * 8).reshape(16, 1)  # 2 heads of head_dim 8, one column
    assert rope_permute(w, 2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7,
                                                  8, 12, 9, 13, 10, 14, 11, 15]
    assert rope_permute(torch.arange(8), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # a bias


def _tiny_llama(tiny_base_dir: Path, out: Path, pre_tokenizer: dict | None) -> Path:
    """A random 2-layer Llama (grouped-query attention, untied head) with the tiny
    tokenizer, its pre-tokenizer replaced by ``pre_tokenizer``."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(out)
    if pre_tokenizer is not None:
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["pre_tokenizer"] = pre_tokenizer
        tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    tok.save_pretrained(out)
    return out


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_llama_roundtrip_is_exact_up_to_the_quantisation(tiny_base_dir: Path, tmp_path: Path,
                                                         qtype: str) -> None:
    """A Llama file: llama metadata, Q/K permuted for ggml's rope; transformers' loader
    reverse-permutes, so every weight comes back as exactly the F16 / Q8_0 rounding of the
    source's, and the tokenizer (GPT-2's split) encodes the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny_llama(tiny_base_dir, tmp_path / "llama", BYTE_LEVEL)
    out = tmp_path / GGUF_FILE
    info = export_gguf(src, out, qtype=qtype, keep_full_precision=["embed_tokens"],
                       enable_thinking=False, chat_template_sha256="x")
    s = read_gguf_summary(out)
    assert s["architecture"] == "llama" and s["block_count"] == 2
    assert s["rope_dimension_count"] == s["key_length"] == 16
    assert s["tensors"]["blk.0.attn_k.weight"]["shape"] == [32, 64]  # 2 kv heads x 16
    assert s["tensors"]["output.weight"]["type"] == ("Q8_0" if qtype == "q8_0" else "F16")
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is False

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    g_model, g_tok = load_exported(out)
    qt = gguf.GGMLQuantizationType.Q8_0
    for name, w in model.state_dict().items():
        if w.ndim == 2 and qtype == "q8_0" and "embed_tokens" not in name:
            expected = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)
            expected = torch.from_numpy(expected.reshape(w.shape))
        else:
            expected = w.half().float() if w.ndim == 2 else w
        assert torch.equal(g_model.state_dict()[name], expected), name
    assert (len(info["layer_errors"]) == 15) == (qtype == "q8_0")  # 7 x 2 layers + output
    text = "Add 12345 and 678, then say 你好 twice."
    assert g_tok(text, add_special_tokens=False)["input_ids"] == tok(
        text, add_special_tokens=False)["input_ids"]
    assert g_tok.chat_template == tok.chat_template


def test_llama_with_an_unknown_pre_tokenizer_is_refused(tiny_base_dir: Path,
                                                        tmp_path: Path) -> None:
    """The tiny tokenizer's own Qwen2 split regex has no llama.cpp name for a Llama file."""
    src = _tiny_llama(tiny_base_dir, tmp_path / "llama", None)
    with pytest.raises(GGUFUnsupported, match=r"pre-tokenizer \(Split\+ByteLevel\) is "
                                              r"neither GPT-2's byte-level split nor one of "
                                              r"smollm: the GGUF would tokenize differently"):
        export_gguf(src, tmp_path / GGUF_FILE, qtype="f16", keep_full_precision=[],
                    enable_thinking=False, chat_template_sha256="x")
    assert not (tmp_path / GGUF_FILE).exists()


def test_bad_qtype(tiny_base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(tiny_base_dir, tmp_path / GGUF_FILE, qtype="q4_0", keep_full_precision=[],
                    enable_thinking=False, chat_template_sha256="x")

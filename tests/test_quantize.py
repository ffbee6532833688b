"""Quantisation: each method on the tiny model, reloads, fresh-process measurement, checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from reprotune import io  # noqa: E402
from reprotune.deploy.artifacts import INT8_METHODS, METHODS, build_artifact, load_artifact  # noqa: E402
from reprotune.deploy.merge import MERGED_INFO_FILE, merge_finetuned, render_probe  # noqa: E402
from reprotune.deploy.quant_common import (  # noqa: E402
    QUANT_INFO_FILE,
    MethodUnavailable,
    TemplateMismatch,
)
from reprotune.deploy.quant_int8 import INT8_WEIGHTS, load_int8_dynamic  # noqa: E402
from reprotune.deploy.quant_measure import (  # noqa: E402
    FreshMeasurer,
    measure,
    measure_in_subprocess,
)
from reprotune.deploy.quantize import check_format, quantize_all  # noqa: E402
from reprotune.modeling import load_model, load_tokenizer  # noqa: E402
from reprotune.params import EvalParams, as_dict  # noqa: E402

KEEP = ["embed_tokens", "lm_head"]
EVAL = as_dict(EvalParams(max_new_tokens=6, batch_size=4))
QA = [("What is 12 plus 7?", "The answer is 19."), ("Translate 'apple' into Chinese", "苹果"),
      ("计算 3 加 4", "答案是 7。"), ("Say hello", "Hello! How can I help you today?")]


@pytest.fixture(scope="module")
def work(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged LoRA model (non-trivial adapter) and a 4-row formatted test split."""
    from peft import LoraConfig, get_peft_model

    from reprotune.data.formatting import format_records, formatted_schema
    from reprotune.train.loading import save_finetuned

    root = tmp_path_factory.mktemp("quant")
    tok = load_tokenizer(tiny_base_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_base_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    save_finetuned(model, tok, root / "ft", method="lora", base_dir=tiny_base_dir,
                   enable_thinking=False)
    merge_finetuned(root / "ft", root / "merged")
    records = [{"id": str(i), "source": f"inline:{i + 1}", "label": None, "group": None,
                "tools": None, "messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]}
               for i, (q, a) in enumerate(QA)]
    rows, _, _ = format_records(records, tok, max_length=128, enable_thinking=False)
    io.write_parquet(root / "test.parquet", rows, schema=formatted_schema())
    return root


@pytest.fixture(scope="module")
def float_model(work: Path):
    return load_model(work / "merged", dtype=torch.float32).eval()


def _logits(model, ids=((5, 17, 42, 99, 3, 7),)):
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)).logits


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_dynamic_roundtrip(work: Path, float_model, tmp_path: Path) -> None:
    """torchao int8: stored pickle-free, reloaded bit-identical, the shared float model kept."""
    before = float_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    info = build_artifact("int8_dynamic", work / "merged", tmp_path / "int8", KEEP, float_model)
    assert torch.equal(float_model.model.layers[0].mlp.up_proj.weight, before)  # not quantised
    assert type(float_model.model.layers[0].mlp.up_proj.weight).__name__ == "Parameter"
    files = {p.name for p in (tmp_path / "int8").iterdir()}
    assert {INT8_WEIGHTS, "config.json", "tokenizer.json", "chat_template.jinja",
            QUANT_INFO_FILE} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "int8").iterdir())
    assert info["quantized_modules"] == 14  # 7 linears x 2 layers; embeddings + head kept
    assert info["api"].startswith("torchao quantize_(Int8DynamicActivationInt8WeightConfig")
    assert 0 < info["layer_error_max"] < 0.01 and len(info["worst_layers"]) == 5
    from safetensors import safe_open

    with safe_open(str(tmp_path / "int8" / INT8_WEIGHTS), "pt") as fh:
        stored = fh.get_tensor("model.layers.0.mlp.up_proj.weight_int8")
        assert stored.dtype == torch.int8
        assert "model.embed_tokens.weight" in set(fh.keys())
    model, tok = load_int8_dynamic(tmp_path / "int8")
    down = model.model.layers[1].mlp.down_proj.weight
    assert type(down).__name__ == "Int8Tensor"  # torchao's, not torch.ao's DynamicQuantizedLinear
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie restored
    assert tok.chat_template == load_tokenizer(work / "merged").chat_template
    # activations are quantised too (dynamically, per token): a few % on tiny random logits
    assert _rel(_logits(model), _logits(float_model)) < 0.05
    # the stored int8 values come back exactly, and they are torchao's own quantisation
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.qdata, stored)
    w = float_model.model.layers[0].mlp.up_proj.weight.detach()
    scale = model.model.layers[0].mlp.up_proj.weight.scale.reshape(-1, 1)
    assert torch.equal(stored, torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)) \
        or (stored.int() - torch.round(w / scale).int()).abs().max() <= 1
    # every quantised Linear came back as one (read from the tensor names)
    assert sum(type(m.weight).__name__ == "Int8Tensor" for m in model.modules()
               if isinstance(m, torch.nn.Linear)) == 14


def test_int8_dynamic_file_bytes_are_reproducible(work: Path, float_model, tmp_path: Path) -> None:
    """The same weights give the same file, build after build (safetensors writes a
    metadata map in hash order: with two keys the bytes changed from run to run)."""
    blobs = set()
    for i in range(6):
        build_artifact("int8_dynamic", work / "merged", tmp_path / f"i{i}", KEEP, float_model)
        blobs.add((tmp_path / f"i{i}" / INT8_WEIGHTS).read_bytes())
    assert len(blobs) == 1


def test_int8_keep_full_precision_fragments(work: Path, float_model, tmp_path: Path) -> None:
    info = build_artifact("int8_dynamic", work / "merged", tmp_path / "int8",
                          KEEP + ["mlp"], float_model)
    assert info["quantized_modules"] == 8  # only attention projections
    assert not any("mlp" in name for name in info["layer_errors"])
    model, _ = load_int8_dynamic(tmp_path / "int8")
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Parameter"
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"


@pytest.mark.parametrize("method,max_err", [("bnb_int8", 0.01), ("bnb_nf4", 0.15)])
def test_bnb_save_and_reload(work: Path, float_model, tmp_path: Path, method: str,
                             max_err: float) -> None:
    info = build_artifact(method, work / "merged", tmp_path / method, KEEP, float_model)
    assert info["quantized_modules"] == 14
    assert 0 < info["layer_error_max"] < max_err
    cfg = io.read_json(tmp_path / method / "config.json")["quantization_config"]
    assert cfg["llm_int8_skip_modules"] == KEEP
    assert cfg["load_in_8bit" if method == "bnb_int8" else "load_in_4bit"] is True
    model, tok, thinking = load_artifact(method, tmp_path / method)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == ("Linear8bitLt" if method == "bnb_int8" else "Linear4bit")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert thinking is False and tok.chat_template
    # int8 also rounds activations (via fp16): a few % on tiny random logits
    assert _rel(_logits(model), _logits(float_model)) < (0.05 if method == "bnb_int8" else 0.25)


def test_bnb_unavailable_is_reported(work: Path, float_model, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MethodUnavailable, match="bitsandbytes cannot quantise"):
        build_artifact("bnb_int8", work / "merged", tmp_path / "bnb", KEEP, float_model)


def test_measure_in_fresh_process(work: Path, float_model, tmp_path: Path) -> None:
    build_artifact("gguf_q8_0", work / "merged", tmp_path / "gguf_q8_0", KEEP, float_model)
    req = {"method": "gguf_q8_0", "path": str(tmp_path / "gguf_q8_0"),
           "test": str(work / "test.parquet"), "eval": EVAL, "eval_rows": 3, "seed": 0}
    res = measure_in_subprocess(req)
    assert res["peft_blocked"] is True  # served without peft
    assert res["tokens_per_s"] > 0 and len(res["first_tokens"]) == 8
    m = res["metrics"]
    assert m["n_rows"] == 3 and m["perplexity"] > 1 and 0 <= m["rouge_l"] <= 1
    tok = load_tokenizer(work / "merged")
    render = render_probe(tok, False)
    assert res["render"] == render
    assert check_format(res, render, tok(render, add_special_tokens=False)["input_ids"],
                        False) == []
    # the same model measured from the merged dir gives the same first greedy tokens
    ref = measure({**req, "method": "merged", "path": str(work / "merged")})
    assert res["first_tokens"] == ref["first_tokens"]
    assert abs(m["perplexity"] / ref["metrics"]["perplexity"] - 1) < 0.02


def test_altered_template_fails_the_check(work: Path, float_model, tmp_path: Path) -> None:
    dest = tmp_path / "int8"
    build_artifact("int8_dynamic", work / "merged", dest, KEEP, float_model)
    jinja = dest / "chat_template.jinja"
    jinja.write_text(jinja.read_text(encoding="utf-8").replace("<|im_end|>", "<|im_end|>\n"),
                     encoding="utf-8")
    res = measure({"method": "int8_dynamic", "path": str(dest), "test": str(work / "test.parquet"),
                   "eval": EVAL, "eval_rows": 1, "seed": 0})
    tok = load_tokenizer(work / "merged")
    render = render_probe(tok, False)
    problems = check_format(res, render, tok(render, add_special_tokens=False)["input_ids"], False)
    assert len(problems) == 1 and "renders the probe differently" in problems[0]
    # and a thinking-mode mismatch is caught on its own
    info = io.read_json(dest / QUANT_INFO_FILE)
    io.write_json(dest / QUANT_INFO_FILE, {**info, "enable_thinking": True})
    shutil.copy2(work / "merged" / "chat_template.jinja", jinja)
    _, _, thinking = load_artifact("int8_dynamic", dest)
    assert thinking is True
    problems = check_format({**res, "enable_thinking": thinking, "render": render_probe(tok, True)},
                            render, [], False)
    assert any("enable_thinking=True" in p for p in problems)


def test_quantize_all_refuses_drifted_training_template(work: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(work / "merged", merged)
    jinja = merged / "chat_template.jinja"
    jinja.write_text(jinja.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(TemplateMismatch, match="not the one training used"):
        quantize_all(merged, work / "test.parquet", tmp_path / "q", methods=["gguf_f16"],
                     keep=KEEP, eval_params=EVAL, eval_rows=1, enable_thinking=False, seed=0)
    with pytest.raises(TemplateMismatch, match="format.enable_thinking is True"):
        quantize_all(work / "merged", work / "test.parquet", tmp_path / "q",
                     methods=["gguf_f16"], keep=KEEP, eval_params=EVAL, eval_rows=1,
                     enable_thinking=True, seed=0)
    assert not (tmp_path / "q").exists()


def test_one_measurer_forks_a_fresh_child_per_artifact_and_survives_a_failure(
        work: Path, tmp_path: Path) -> None:
    """A failed measurement ends in a one-line cause with the child's last lines, and the
    next requests are measured by new children of the same serving process: two equal
    measurements (nothing carried over from the failed one or from the first), peft blocked
    in each."""
    req = {"method": "merged", "path": str(work / "merged"), "test": str(work / "test.parquet"),
           "eval": EVAL, "eval_rows": 2, "seed": 0}
    with FreshMeasurer() as measurer:
        server = measurer._proc.pid
        with pytest.raises(RuntimeError, match=r"measuring merged \(.*missing\) failed with exit "
                                               r"code 1:\n(.|\n)*missing"):
            measurer.measure({**req, "path": str(tmp_path / "missing")})
        first = measurer.measure(req)
        second = measurer.measure(req)
        assert measurer._proc.poll() is None and measurer._proc.pid == server
    assert measurer._proc is None  # stopped on leaving the block
    assert first["peft_blocked"] is second["peft_blocked"] is True
    assert (first["first_tokens"], first["metrics"]) == (second["first_tokens"],
                                                         second["metrics"])
    assert len(first["first_tokens"]) == 8 and first["metrics"]["n_rows"] == 2


def test_skipped_method_has_recorded_reason(work: Path, tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # a qwen2-architecture "merged" model: GGUF export maps qwen3 and llama only -> skipped,
    # not absent
    merged = tmp_path / "merged"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(load_tokenizer(work / "merged")), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(merged)
    for f in (work / "merged").iterdir():
        if f.name.startswith(("tokenizer", "chat_template")) or f.name == MERGED_INFO_FILE:
            shutil.copy2(f, merged / f.name)
    metrics, details = quantize_all(merged, work / "test.parquet", tmp_path / "q",
                                    methods=["gguf_q8_0"], keep=KEEP, eval_params=EVAL,
                                    eval_rows=2, enable_thinking=False, seed=0)
    assert metrics["gguf_q8_0"]["status"] == "skipped"
    assert "'qwen3' or 'llama' only, got 'qwen2'" in metrics["gguf_q8_0"]["reason"]
    assert io.read_json(tmp_path / "q" / "gguf_q8_0" / QUANT_INFO_FILE)["status"] == "skipped"
    assert metrics["merged"]["status"] == "ok" and metrics["format_ok"] is True


@pytest.mark.slow
def test_quantize_stage_end_to_end(work: Path, tmp_path: Path, repo_root: Path) -> None:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    params = yaml.load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    params["eval"].update(max_new_tokens=6, batch_size=4)
    # every method but the ONNX pair, whose export and measurement
    # test_onnx_fp32_and_int8_run_on_onnxruntime covers (~35 s more here)
    methods = [m for m in METHODS if not m.startswith("onnx")]
    params["quantize"].update(eval_rows=0, methods=methods)
    with (tmp_path / "params.yaml").open("w", encoding="utf-8") as fh:
        yaml.dump(params, fh)
    out = tmp_path / "quantized"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "stages" / "quantize.py"), "--merged",
         str(work / "merged"), "--test", str(work / "test.parquet"), "--out", str(out),
         "--metrics", str(tmp_path / "quantize.json"), "--report", str(tmp_path / "q.md")],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = io.read_json(tmp_path / "quantize.json")
    timing = io.read_json(tmp_path / "metrics" / "timing" / "quantize.json")  # untracked
    assert metrics["format_ok"] is True and metrics["n_eval_rows"] == 4
    assert "tokens_per_s" not in metrics["merged"] and timing["merged"]["tokens_per_s"] > 0
    sha = io.read_json(work / "merged" / MERGED_INFO_FILE)["chat_template_sha256"]
    for method in methods:
        row = metrics[method]
        assert row["status"] == "ok", row
        assert (out / method / QUANT_INFO_FILE).is_file()
        assert row["size_mb"] > 0
        assert row["compression"] > 1.3
        assert timing[method]["tokens_per_s"] > 0 and timing[method]["speedup"] > 0
        assert row["template_sha256"] == sha and row["template_ok"] is True
        if method in ("int8_dynamic", "bnb_int8", "gguf_q8_0", "gguf_f16"):
            assert abs(row["ppl_delta_pct"]) < 2 and row["first_tokens_match"] >= 4
        # 4 test rows: the interval-based gate refuses to call it either way
        assert row["gate"] == "too few rows to tell" and row["gate_rows"] == 4
        assert row["within_target"] is False
    report = (tmp_path / "q.md").read_text(encoding="utf-8")
    assert report.count("on 4 rows (rouge_l: 4) -> too few rows to tell") == len(
        [m for m in INT8_METHODS if m in methods])
    assert report.count("| ok |") == 1 + len(methods)
    assert "All artifacts render it identically to training." in report


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_onnx_fp32_and_int8_run_on_onnxruntime(work: Path, float_model, tmp_path: Path) -> None:
    """Exported with torch.onnx (dynamo), quantised by onnxruntime, measured through an ORT
    session: the loaded model holds no torch weights at all."""
    ids = ((5, 17, 42, 99, 3, 7, 8, 9),)
    fp32 = build_artifact("onnx_fp32", work / "merged", tmp_path / "fp32", KEEP, float_model)
    int8 = build_artifact("onnx_int8", work / "merged", tmp_path / "int8", KEEP, float_model)
    again = build_artifact("onnx_int8", work / "merged", tmp_path / "again", KEEP, float_model)
    # reproducible: the exporter's per-process FX counters no longer reach the file
    assert (tmp_path / "again/model.onnx").read_bytes() == (tmp_path / "int8/model.onnx").read_bytes()
    assert again == int8
    assert fp32["quantized_modules"] == 0 and "torch.onnx (dynamo)" in fp32["exporter"]
    assert int8["quantized_modules"] == 14  # 7 MatMuls x 2 layers; embeddings + head kept
    assert 0 < int8["layer_error_max"] < 0.01
    size = {m: (tmp_path / m / "model.onnx").stat().st_size for m in ("fp32", "int8")}
    assert size["int8"] < 0.8 * size["fp32"]
    for method, folder, tol in (("onnx_fp32", "fp32", 1e-4), ("onnx_int8", "int8", 0.05)):
        model, tok, thinking = load_artifact(method, tmp_path / folder)
        assert type(model).__name__ == "OrtCausalLM" and thinking is False
        assert sum(p.numel() for p in model.parameters()) == 1  # no weights in torch
        assert _rel(_logits(model, ids), _logits(float_model, ids)) < tol
        assert tok.chat_template == load_tokenizer(work / "merged").chat_template
    req = {"method": "onnx_int8", "path": str(tmp_path / "int8"),
           "test": str(work / "test.parquet"), "eval": EVAL, "eval_rows": 2, "seed": 0}
    res = measure_in_subprocess(req)
    assert res["peft_blocked"] is True and res["tokens_per_s"] > 0
    assert len(res["first_tokens"]) == 8 and res["metrics"]["n_rows"] == 2
    ref = measure({**req, "method": "merged", "path": str(work / "merged")})
    assert abs(res["metrics"]["perplexity"] / ref["metrics"]["perplexity"] - 1) < 0.05

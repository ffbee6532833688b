"""Merge stage: LoRA/DoRA merged (plain transformers, no peft), soft prompts kept, full copied."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from reprotune import io  # noqa: E402
from reprotune.deploy.merge import (  # noqa: E402
    MERGED_INFO_FILE,
    SOFT_PROMPT_DIR,
    load_merged,
    merge_finetuned,
    render_difference,
    render_probe,
)
from reprotune.modeling import load_model, load_tokenizer  # noqa: E402
from reprotune.train.loading import load_finetuned, save_finetuned  # noqa: E402

IDS = [[5, 17, 42, 99, 3, 250, 7, 11]]


def make_finetuned(base: Path, out: Path, method: str, **kw) -> Path:
    """An adapter / full model as the train stage writes it, with non-trivial weights."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = load_model(base)
    if method == "lora":  # init_lora_weights=False: B is random, so the adapter changes logits
        model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            init_lora_weights=False, use_dora=kw.get("dora", False)))
    elif method == "prompt_tuning":
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4,
                                                         task_type="CAUSAL_LM"))
    elif method == "prefix_tuning":
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=4,
                                                         task_type="CAUSAL_LM"))
    else:  # full: perturb the weights so "copied unchanged" is visible
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    save_finetuned(model, tok, out, method=method, base_dir=base,
                   enable_thinking=kw.get("enable_thinking", False))
    return out


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)).logits[:, -len(ids[0]):]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_merge_matches_adapter(tiny_base_dir: Path, tmp_path: Path, dora: bool) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "lora", dora=dora)
    info = merge_finetuned(ft, tmp_path / "merged")
    assert info["merged"] is True and info["peft_type"] == "LORA"
    assert info["max_abs_logit_diff"] < 1e-4
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
            MERGED_INFO_FILE} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (tmp_path / "merged").iterdir())
    manifest = io.read_json(tmp_path / "merged" / MERGED_INFO_FILE)
    train = io.read_json(ft / "reprotune_train.json")
    assert manifest["chat_template_sha256"] == train["chat_template_sha256"]
    assert manifest["enable_thinking"] is False and manifest["method"] == "lora"

    adapter, _, _ = load_finetuned(ft)
    merged = load_model(tmp_path / "merged").eval()
    base = load_model(tiny_base_dir).eval()
    assert not torch.allclose(_logits(base), _logits(adapter), atol=1e-3)  # adapter matters
    torch.testing.assert_close(_logits(merged), _logits(adapter), atol=1e-5, rtol=1e-5)


def test_merged_loads_without_peft(tiny_base_dir: Path, tmp_path: Path) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "lora")
    merge_finetuned(ft, tmp_path / "merged")
    script = (
        "import sys, json, importlib.util\n"
        "sys.modules['peft'] = None  # any `import peft` now raises ImportError\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(tmp_path / 'merged')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "t = AutoTokenizer.from_pretrained(d)\n"
        "try:\n    import peft  # noqa\n    ok = False\nexcept ImportError:\n    ok = True\n"
        f"out = m(input_ids=torch.tensor({IDS})).logits\n"
        "print(json.dumps({'peft_blocked': ok, 'cls': type(m).__name__, "
        "'template': bool(t.chat_template), 'logits': out[0, -1, :16].tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["peft_blocked"] is True and got["template"] is True
    assert got["cls"] == "Qwen3ForCausalLM"
    adapter, _, _ = load_finetuned(ft)
    torch.testing.assert_close(torch.tensor(got["logits"]), _logits(adapter)[0, -1, :16],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_soft_prompt_is_kept_not_merged(tiny_base_dir: Path, tmp_path: Path,
                                        method: str) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", method)
    info = merge_finetuned(ft, tmp_path / "merged")
    assert info["merged"] is False and "cannot be merged" in info["reason"]
    assert info["soft_prompt_dir"] == SOFT_PROMPT_DIR
    merged = tmp_path / "merged"
    assert io.read_json(merged / MERGED_INFO_FILE)["merged"] is False
    assert (merged / SOFT_PROMPT_DIR / "adapter_config.json").is_file()
    assert (merged / SOFT_PROMPT_DIR / "adapter_model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    # the top level is the unchanged base model
    base_model = load_model(tiny_base_dir).eval()
    torch.testing.assert_close(_logits(load_model(merged).eval()), _logits(base_model))
    # base + kept soft prompt == the trained model
    model, tok, manifest = load_merged(merged)
    adapter, _, _ = load_finetuned(ft)
    assert manifest["method"] == method and tok.chat_template
    torch.testing.assert_close(_logits(model), _logits(adapter))


def test_full_finetune_copied_unchanged(tiny_base_dir: Path, tmp_path: Path) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "full")
    info = merge_finetuned(ft, tmp_path / "merged")
    assert info["merged"] is True and info["kind"] == "full" and "copied" in info["reason"]
    assert _sha(tmp_path / "merged" / "model.safetensors") == _sha(ft / "model.safetensors")
    assert _sha(tmp_path / "merged" / "tokenizer.json") == _sha(ft / "tokenizer.json")


def test_template_drift_is_refused(tiny_base_dir: Path, tmp_path: Path) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "lora")
    jinja = ft / "chat_template.jinja"
    jinja.write_text(jinja.read_text(encoding="utf-8").replace("<|im_start|>", "<|im_start|> "),
                     encoding="utf-8")
    with pytest.raises(ValueError, match="chat template sha256"):
        merge_finetuned(ft, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_manifest_field(tiny_base_dir: Path, tmp_path: Path) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "lora")
    manifest = io.read_json(ft / "reprotune_train.json")
    del manifest["enable_thinking"]
    io.write_json(ft / "reprotune_train.json", manifest)
    with pytest.raises(ValueError, match="reprotune_train.json: missing field.*enable_thinking"):
        merge_finetuned(ft, tmp_path / "merged")


def test_render_probe_and_difference(tiny_base_dir: Path) -> None:
    tok = load_tokenizer(tiny_base_dir)
    off, on = render_probe(tok, False), render_probe(tok, True)
    assert off.count("<|im_start|>") == 5  # system, user, assistant, user, generation prompt
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    assert render_difference(off, off) is None
    assert "first difference at char" in render_difference(off, on)


def test_merge_stage_cli(tiny_base_dir: Path, tmp_path: Path, repo_root: Path) -> None:
    ft = make_finetuned(tiny_base_dir, tmp_path / "ft", "prompt_tuning")
    proc = subprocess.run([sys.executable, str(repo_root / "stages" / "merge.py"),
                           "--finetuned", str(ft), "--out", str(tmp_path / "merged"),
                           "--metrics", str(tmp_path / "merge.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = io.read_json(tmp_path / "merge.json")
    assert metrics["merged"] is False and metrics["method"] == "prompt_tuning"
    assert "cannot be merged" in metrics["reason"] and metrics["size_mb"] > 0
    assert "NOT merged" in proc.stderr

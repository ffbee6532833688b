"""The forgetting check: general-text perplexity of base vs fine-tuned, with its interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from reprotune.evaluate.forgetting import (
    GeneralTextError,
    compare_general,
    load_general_text,
    report_section,
    score_general_text,
)
from reprotune.params import EvalParams

SHIPPED = REPO_ROOT / EvalParams().general_text


def test_the_shipped_general_text_is_60_distinct_rows_in_two_languages() -> None:
    rows = load_general_text(SHIPPED)
    assert len(rows) == 60 and len({r["text"] for r in rows}) == 60
    assert sum(r["lang"] == "en" for r in rows) == 40 and sum(r["lang"] == "zh" for r in rows) == 20
    # no row of it is in the demo data sets the pipeline trains on
    from reprotune.data.demo import generate_demo

    demo = "\n".join(generate_demo(2400, 0) + generate_demo(400, 0, "assistant"))
    assert not any(r["text"][:40] in demo for r in rows)


@pytest.mark.parametrize("text, message", [
    ('{"text": "ok"}\n{oops\n', ":2: not JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', ":3: field 'text' missing or empty"),
    ('{"text": "   "}\n', ":1: field 'text' missing or empty"),
    ("\n", ": no rows"),
])
def test_a_bad_general_text_file_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GeneralTextError) as exc:
        load_general_text(path)
    assert str(exc.value).startswith(f"{path}{message}") and "\n" not in str(exc.value)


def test_same_model_twice_is_no_change_and_a_damaged_one_is_worse(tiny_base_dir: Path) -> None:
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    model = load_model(tiny_base_dir, dtype=torch.float32)
    rows = load_general_text(SHIPPED)
    metrics, base = score_general_text(model, tok, rows, batch_size=16, progress=False)
    assert metrics["rows"] == 60 and metrics["tokens"] == sum(r["n_tokens"] for r in base)
    # corpus perplexity: exp(total NLL / total tokens), not a mean of per-row perplexities
    total = sum(r["nll"] for r in base) / metrics["tokens"]
    assert metrics["perplexity"] == pytest.approx(math.exp(total), rel=1e-5)
    assert [r["id"] for r in base] == list(range(60)) and base[0]["lang"] == "en"
    same = compare_general(base, score_general_text(model, tok, rows, 16, progress=False)[1])
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    assert same["verdict"] == "no detectable change" and same["rows"] == 60
    with torch.no_grad():  # a "fine-tune" that wrecked the output layer
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight,
                                                   generator=torch.Generator().manual_seed(0)))
    damaged = compare_general(base, score_general_text(model, tok, rows, 16, progress=False)[1])
    assert damaged["verdict"] == "worse" and damaged["low"] > 0
    # the same corpus perplexity from the per-row records (each NLL rounded) and from the
    # corpus total: both printed to 6 decimals, so they agree within two roundings
    assert damaged["finetuned"] > damaged["base"]
    assert damaged["base"] == pytest.approx(metrics["perplexity"], abs=2e-6)
    section = report_section(damaged)
    assert "## Forgetting check" in section and "**worse**" in section


def test_records_of_other_rows_are_refused() -> None:
    a = [{"id": 0, "n_tokens": 5, "nll": 3.0}, {"id": 1, "n_tokens": 4, "nll": 2.0}]
    b = [{"id": 0, "n_tokens": 5, "nll": 3.0}, {"id": 1, "n_tokens": 6, "nll": 2.0}]
    with pytest.raises(GeneralTextError, match="rerun eval_base"):
        compare_general(a, b)


def test_the_general_text_file_is_checked_before_any_stage(tmp_path: Path) -> None:
    from reprotune.params import ParamsError, check_paths, read_params

    (tmp_path / "params.yaml").write_text("eval:\n  general_text: data/nothing.jsonl\n")
    with pytest.raises(ParamsError, match=r"^eval.general_text: 'data/nothing.jsonl': no such file"):
        check_paths(read_params(tmp_path / "params.yaml"), tmp_path)


@pytest.mark.slow
def test_a_pretrained_model_reads_the_general_text_fluently(smollm2_base: Path) -> None:
    """SmolLM2 (trained on English web text) finds the English paragraphs predictable; the
    file is real language, not noise. Its Chinese is weak (the model card says English only)."""
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    tok, model = load_tokenizer(smollm2_base), load_model(smollm2_base, dtype=torch.float32)
    rows = load_general_text(SHIPPED)
    en = [r for r in rows if r["lang"] == "en"]
    metrics, records = score_general_text(model, tok, en, batch_size=8, progress=False)
    assert metrics["perplexity"] < 30, metrics
    assert json.dumps(records)  # plain JSON, as written to data/eval/general*.jsonl

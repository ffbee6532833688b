"""KTO on unpaired data (issue 29 item 1): every unpaired layout read with its flag and
counted per flag at ingest, undesirable answers never SFT targets, the check stage refusing
any other align.method, and a tiny-model KTO align run on unpaired rows (CPU)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.ingest import ingest_rows
from reprotune.data.pairs import format_unpaired, unpaired_records
from reprotune.data.preference import PairsError, check_unpaired, count_unpaired, unpaired_sides
from reprotune.data.readers import RawRow
from reprotune.params import AlignParams

ROOT = Path(__file__).resolve().parents[1]


def _layout(i: int, prompt: str, answer: str, good: bool) -> dict:
    """One unpaired row in the i-th of the accepted layouts."""
    user, bot = {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}
    return [
        {"prompt": prompt, "completion": answer, "label": good},  # TRL, strings
        {"prompt": [user], "completion": [bot], "label": "true" if good else "False"},  # TRL conv.
        {"messages": [user, bot], "label": good},  # LLaMA-Factory kto_en_demo.json
        {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
         "kto_tag": good},  # LLaMA-Factory kto_tag
        {"instruction": prompt, "output": answer, "kto_tag": good},
    ][i % 5]


def raw_rows(n: int, seed: int) -> list[dict]:
    """A learnable flag: right sums are desirable, Chinese rambling undesirable; each prompt
    once, alternating flags, cycling through the layouts; plus two plain SFT rows."""
    r, out = random.Random(seed), []
    for i in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        good = i % 2 == 0
        answer = f"The answer is {a + b}." if good else f"这部电影很糟糕 {a} {b}。"
        out.append(_layout(i // 2, f"What is {a} plus {b}?", answer, good))
    return out + [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]


def _ingest(rows: list[dict]):
    return ingest_rows([RawRow(source="kto.jsonl", line=i + 1, data=r) for i, r in enumerate(rows)])


def test_every_unpaired_layout_is_read_with_its_flag_and_counted():
    rows = raw_rows(20, 0)
    res = _ingest(rows)
    assert not res.rejects
    c = res.counts
    assert (c["kto_desirable"], c["kto_undesirable"], c["kept"]) == (10, 10, 22)
    assert {f: c["formats"][f]["kept"] for f in c["formats"]} == {
        "prompt_completion": 8, "messages": 4, "sharegpt": 4, "alpaca": 6}
    for raw, rec in zip(rows[:20], res.records[:20], strict=True):
        prompt, completion, desirable = unpaired_sides(rec)
        assert desirable == (raw.get("label", raw.get("kto_tag")) in (True, "true"))
        assert [m["role"] for m in prompt] == ["user"] and completion[0]["role"] == "assistant"
        assert rec["label"] is None  # the flag is not a class label
    assert all("kto" not in rec for rec in res.records[20:])


def test_messages_row_judges_its_last_assistant_turn():
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "bad"}]
    rec = _ingest([{"messages": turns, "label": False}]).records[0]
    prompt, completion, desirable = unpaired_sides(rec)
    assert (prompt, completion, desirable) == (turns[:3], turns[3:], False)
    res = _ingest([{"messages": turns[:3], "label": True}, {"prompt": "q", "completion": "a",
                                                            "kto_tag": "maybe"}])
    assert [r["reason"] for r in res.rejects] == ["invalid_kto_row", "invalid_kto_row"]


@pytest.fixture(scope="module")
def kto_dir(tmp_path_factory, tiny_base_dir):
    """Splits of unpaired rows (ingested), formatted: SFT Parquet, pairs and unpaired files,
    and a full "SFT" folder (the tiny base as train writes it)."""
    from reprotune.data.format_stream import format_splits
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    root = tmp_path_factory.mktemp("kto")
    tok = load_tokenizer(tiny_base_dir)
    save_finetuned(load_model(tiny_base_dir), tok, root / "sft", method="full",
                   base_dir=tiny_base_dir, enable_thinking=False)
    datas = {}
    for split, n, seed in (("train", 48, 0), ("val", 12, 1), ("test", 8, 2)):
        datas[split] = root / "splits" / f"{split}.jsonl"
        io.write_jsonl(datas[split], _ingest(raw_rows(n, seed)).records)
    outs = {s: root / "processed" / f"{s}.parquet" for s in datas}
    format_splits(datas, tok, outs=outs, dropped=root / "dropped.jsonl", max_length=256,
                  enable_thinking=False, model_limit=None, warn_truncated=1.0, num_proc=1,
                  progress=False)
    for split, path in datas.items():
        rows, stats, drops = format_unpaired(unpaired_records(path), tok, max_length=256,
                                             enable_thinking=False)
        io.write_jsonl(root / "pairs" / f"unpaired_{split}.jsonl", rows)
        io.write_jsonl(root / "pairs" / f"{split}.jsonl", [])  # no pairs in this data
        assert not drops and stats["desirable"] == stats["undesirable"] > 0
    return root


def test_undesirable_answers_are_never_sft_targets(kto_dir):
    import pyarrow.parquet as pq

    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(kto_dir / "sft")
    for split in ("train", "val", "test"):
        recs = io.read_jsonl(kto_dir / "splits" / f"{split}.jsonl")
        bad = {unpaired_sides(r)[1][0]["content"] for r in recs
               if unpaired_sides(r) and not unpaired_sides(r)[2]}
        good = {unpaired_sides(r)[1][0]["content"] for r in recs
                if unpaired_sides(r) and unpaired_sides(r)[2]}
        table = pq.read_table(kto_dir / "processed" / f"{split}.parquet").to_pylist()
        texts = [row["text"] for row in table]
        targets = [tok.decode([t for t in row["labels"] if t >= 0]) for row in table]
        assert len(table) == len(recs) - len(bad)  # the desirable and plain SFT rows
        assert not any(b in t for b in bad for t in texts + targets)
        assert all(any(g in t for t in targets) for g in good)  # as a pair's chosen
        drops = [d for d in io.read_jsonl(kto_dir / "dropped.jsonl") if d["split"] == split]
        assert len(drops) == len(bad) and {d["reason"] for d in drops} == {"kto_undesirable"}
        # ... and they are KTO examples, flagged
        unpaired = io.read_jsonl(kto_dir / "pairs" / f"unpaired_{split}.jsonl")
        assert {r["completion"][0]["content"] for r in unpaired if not r["label"]} == bad


def test_any_other_method_refuses_unpaired_rows_naming_the_setting(tmp_path):
    split = tmp_path / "data/interim/splits/train.jsonl"
    rows = raw_rows(4, 0)
    io.write_jsonl(split, [{**r, "source": "data/raw/demo.jsonl:1"} for r in _ingest(rows).records])
    assert count_unpaired(split) == {"desirable": 2, "undesirable": 2}
    check_unpaired("kto", count_unpaired(split), str(split))
    with pytest.raises(PairsError, match="set align.method: kto"):
        check_unpaired("none", count_unpaired(split), str(split))
    for method in ("none", "dpo"):  # the check stage, as DVC runs it: one line, no traceback
        params = (ROOT / "params.yaml").read_text(encoding="utf-8").replace(
            "  method: none        # none:", f"  method: {method}        # none:")
        (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(ROOT / "stages/check.py")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert ("has 4 unpaired KTO rows (2 desirable, 2 undesirable)" in proc.stderr
                and "set align.method: kto" in proc.stderr), proc.stderr
        assert not (tmp_path / "metrics/params_ok.json").exists()


def test_kto_align_runs_on_unpaired_rows(kto_dir):
    from reprotune.train.align import align_model

    cfg = AlignParams(method="kto", lr=2e-3, epochs=1, batch_size=4, eval_steps=2,
                      logging_steps=1, patience=0, max_steps=2)
    m = align_model(train_pairs=kto_dir / "pairs/train.jsonl",
                    val_pairs=kto_dir / "pairs/val.jsonl", finetuned=kto_dir / "sft",
                    out_dir=kto_dir / "aligned", checkpoints_dir=kto_dir / "ckpt",
                    live_dir=kto_dir / "curves", cfg=cfg, seed=0)
    assert (m["train_pairs"], m["val_pairs"]) == (0, 0)
    assert m["train_unpaired"] == {"desirable": 24, "undesirable": 24}
    assert m["val_unpaired"] == {"desirable": 6, "undesirable": 6}
    assert m["val_evaluated"] and m["train_steps"] == 2 and m["initial_val_loss"] is not None
    assert json.loads((kto_dir / "aligned/reprotune_align.json").read_text())["method"] == "kto"
    with pytest.raises(Exception, match="set align.method: kto"):
        align_model(train_pairs=kto_dir / "pairs/train.jsonl",
                    val_pairs=kto_dir / "pairs/val.jsonl", finetuned=kto_dir / "sft",
                    out_dir=kto_dir / "dpo", checkpoints_dir=kto_dir / "dpo_ckpt",
                    live_dir=kto_dir / "dpo_curves", cfg=replace(cfg, method="dpo"), seed=0)

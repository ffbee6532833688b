"""Reference log-probs computed once (issue 29 item 2): the ref_logps stage's cache gives the
same bytes from the same inputs, align with it equals align without it (dpo and kto, tiny
model, CPU), and a cache made from other inputs is not used."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from test_kto import _ingest, raw_rows

from reprotune import io
from reprotune.data.ingest import convert_row
from reprotune.data.pairs import format_pairs, format_unpaired, unpaired_records
from reprotune.params import AlignParams

pytestmark = pytest.mark.slow

DPO = AlignParams(method="dpo", lr=2e-3, epochs=1, batch_size=4, eval_steps=2, logging_steps=1,
                  patience=0, max_steps=3)
KTO = replace(DPO, method="kto")


def _pairs(n: int, seed: int) -> list[dict]:
    r, out = random.Random(seed), []
    for i in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        _, rec = convert_row({"prompt": f"What is {a} plus {b}?",
                              "chosen": f"The answer is {a + b}.", "rejected": f"这部电影 {a}。"})
        out.append({**rec, "source": f"t.jsonl:{i}"})
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_base_dir):
    """A full "SFT" folder, pair files per split (dpo/) and pairs + unpaired files (kto/),
    as format writes them."""
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    root = tmp_path_factory.mktemp("ref_logps")
    tok = load_tokenizer(tiny_base_dir)
    save_finetuned(load_model(tiny_base_dir), tok, root / "sft", method="full",
                   base_dir=tiny_base_dir, enable_thinking=False)
    for split, n, seed in (("train", 12, 0), ("val", 6, 1)):
        rows, _, _ = format_pairs(iter(_pairs(n, seed)), tok, max_length=256,
                                  enable_thinking=False)
        rows = list(rows)
        io.write_jsonl(root / "dpo" / f"{split}.jsonl", rows)  # pairs only
        io.write_jsonl(root / "kto" / f"{split}.jsonl", rows)  # pairs and unpaired rows
        io.write_jsonl(root / "recs.jsonl", _ingest(raw_rows(n, seed + 10)).records)
        rows, _, _ = format_unpaired(unpaired_records(root / "recs.jsonl"), tok, max_length=256,
                                     enable_thinking=False)
        io.write_jsonl(root / "kto" / f"unpaired_{split}.jsonl", rows)
    return root


def _cache(root: Path, cfg: AlignParams, out: str) -> dict:
    from reprotune.train.align import reference_trainer
    from reprotune.train.ref_logps import write

    trainer, fp, device, precision = reference_trainer(
        train_pairs=root / cfg.method / "train.jsonl", val_pairs=root / cfg.method / "val.jsonl",
        finetuned=root / "sft", cfg=cfg, seed=0)
    return write(root / out, trainer, cfg, fp, device, precision, 0)


def _align(root: Path, cfg: AlignParams, name: str, ref: str | None) -> dict:
    from reprotune.train.align import align_model

    return align_model(train_pairs=root / cfg.method / "train.jsonl",
                       val_pairs=root / cfg.method / "val.jsonl",
                       finetuned=root / "sft", out_dir=root / name,
                       checkpoints_dir=root / f"{name}_ckpt", live_dir=root / f"{name}_curves",
                       cfg=cfg, seed=0, ref_logps=None if ref is None else root / ref)


@pytest.mark.parametrize("cfg", [DPO, KTO], ids=["dpo", "kto"])
def test_cached_reference_logps_give_the_uncached_results(inputs, cfg):
    m = cfg.method
    info = _cache(inputs, cfg, f"{m}_ref")
    assert info["computed"] and info["columns"] == (
        ["ref_chosen_logps", "ref_rejected_logps"] if m == "dpo" else ["ref_logps", "ref_KL_logps"])
    n_train = 12 if m == "dpo" else 2 * 12 + 12  # kto: both halves of each pair + unpaired
    assert info["rows"] == {"train": n_train, "val": n_train // 2}
    # same inputs, same bytes
    _cache(inputs, cfg, f"{m}_ref2")
    for f in ("train.parquet", "val.parquet", "info.json"):
        assert (inputs / f"{m}_ref" / f).read_bytes() == (inputs / f"{m}_ref2" / f).read_bytes(), f
    # a beta the cache was not made with: the cache still applies (beta does not shape it)
    run = replace(cfg, beta=0.3)
    cached = _align(inputs, run, f"{m}_cached", f"{m}_ref")
    plain = _align(inputs, run, f"{m}_plain", None)
    assert cached["ref_logps_cached"] and not plain["ref_logps_cached"]
    drop = ("ref_logps_cached", "train_time_s", "wall_time_s")
    assert {k: v for k, v in cached.items() if k not in drop} == \
        {k: v for k, v in plain.items() if k not in drop}
    for f in ("model.safetensors",):
        assert (inputs / f"{m}_cached" / f).read_bytes() == (inputs / f"{m}_plain" / f).read_bytes()
    for tsv in (inputs / f"{m}_plain_curves/plots/metrics").glob("*.tsv"):
        assert (inputs / f"{m}_cached_curves/plots/metrics" / tsv.name).read_text() == \
            tsv.read_text(), tsv.name


def test_a_cache_of_other_inputs_is_not_used(inputs, caplog):
    _cache(inputs, DPO, "dpo_ref_bs4")
    m = _align(inputs, replace(DPO, batch_size=2, max_steps=1), "dpo_bs2", "dpo_ref_bs4")
    assert not m["ref_logps_cached"]
    assert "computed from other inputs" in caplog.text


def test_nothing_to_cache_writes_info_only(inputs, tmp_path):
    from reprotune.train.ref_logps import load, skipped

    info = skipped(tmp_path / "ref", AlignParams(method="orpo"), "full")
    assert not info["computed"] and sorted(p.name for p in (tmp_path / "ref").iterdir()) == \
        ["info.json"]
    assert load(tmp_path / "ref", "any") is None

"""Paired-bootstrap intervals, verdicts, AUC and the quantise gate (reprotune.evaluate.
significance / paired), on synthetic rows and on real Chinese answers when ../shared has them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from reprotune.evaluate import significance as S
from reprotune.evaluate.paired import compare_records, intervals_file, quantise_gate, row_statistics

LABELS = ("negative", "neutral", "positive")


def _records(n: int, seed: int = 0, wrong: float = 0.3) -> list[dict]:
    """n prediction records with text, NLL, mapped labels and label probabilities."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ref = f"答案是 {i % 17}。The answer is {i % 11}, said user {i}."
        pred = ref if rng.random() > wrong else f"不知道 {i % 5}, maybe {i % 3}"
        gold = LABELS[i % 3]
        probs = rng.dirichlet(np.ones(3))
        probs[i % 3] += 0.5
        probs /= probs.sum()
        out.append({"id": f"row{i}", "prediction": pred, "reference": ref, "label": gold,
                    "pred_label": gold if rng.random() > wrong else LABELS[(i + 1) % 3],
                    "label_probs": dict(zip(LABELS, probs.round(6).tolist(), strict=True)),
                    "nll": float(rng.gamma(2.0, 1.0) * 10), "n_tokens": 10})
    return out


def test_identical_files_give_zero_interval_and_no_change() -> None:
    recs = _records(120)
    cmp = compare_records(recs, json.loads(json.dumps(recs)))
    assert cmp["n_shared"] == 120 and cmp["n_labelled"] == 120
    assert set(cmp["metrics"]) == {"bleu", "chrf", "rouge1", "rouge2", "rouge_l", "f1", "em",
                                   "nll", "perplexity", "accuracy", "macro_f1", "auc"}
    for name, m in cmp["metrics"].items():
        assert (m["diff"], m["low"], m["high"]) == (0.0, 0.0, 0.0), name
        assert m["verdict"] == S.NO_CHANGE, name


def test_blanked_answers_are_worse_with_interval_excluding_zero() -> None:
    recs = _records(120)
    blank = [{**r, "prediction": ""} for r in recs]
    mets = compare_records(recs, blank)["metrics"]
    for name in ("bleu", "chrf", "rouge1", "rouge2", "rouge_l", "f1", "em"):
        m = mets[name]
        assert m["verdict"] == S.WORSE and m["high"] < 0 and m["low"] <= m["diff"] <= m["high"]
    # and the other way round it is better
    assert compare_records(blank, recs)["metrics"]["bleu"]["verdict"] == S.BETTER


def test_higher_nll_is_worse_lower_is_better() -> None:
    recs = _records(100)
    worse = [{**r, "nll": r["nll"] * 1.2} for r in recs]
    mets = compare_records(recs, worse)["metrics"]
    assert mets["nll"]["verdict"] == S.WORSE and mets["perplexity"]["verdict"] == S.WORSE
    assert mets["nll"]["diff"] > 0 and mets["nll"]["low"] > 0
    assert compare_records(worse, recs)["metrics"]["perplexity"]["verdict"] == S.BETTER


def _sharegpt_answers(shared_dir: Path, n: int) -> list[str]:
    path = shared_dir / "data" / "sharegpt_zh_1K_format.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            if turn["from"] == "gpt" and 10 < len(turn["value"]) < 300:
                out.append(turn["value"])
                break
        if len(out) == n:
            break
    return out


def test_bleu_and_chrf_intervals_match_sacrebleu_paired_bootstrap(shared_dir: Path) -> None:
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import _compute_p_value, _paired_bs_test, estimate_ci

    refs = _sharegpt_answers(shared_dir, 150)  # real Chinese answers
    base = [r[: len(r) // 2] for r in refs]
    system = [r[: 2 * len(r) // 3] if i % 2 else r[len(r) // 3:] for i, r in enumerate(refs)]
    a = [{"id": str(i), "prediction": p, "reference": r}
         for i, (p, r) in enumerate(zip(base, refs, strict=True))]
    b = [{"id": str(i), "prediction": p, "reference": r}
         for i, (p, r) in enumerate(zip(system, refs, strict=True))]
    cmp = compare_records(a, b)
    assert cmp["bleu_tokenize"] == "zh"
    idx = S.resample_indices(len(refs))
    for name, metric in (("bleu", BLEU(tokenize="zh")), ("chrf", CHRF())):
        bl_stats = metric._extract_corpus_statistics(base, [refs])
        _, theirs = _paired_bs_test({name: (bl_stats, metric._aggregate_and_compute(bl_stats))},
                                    "b", system, [refs], {name: metric}, n_samples=1000,
                                    seed=S.SEED)
        stats_b = metric._extract_corpus_statistics(system, [refs])
        fa, fb, ra, rb = S.paired_corpus(bl_stats, stats_b, S.sacrebleu_scorer(metric), idx)
        mean, ci = estimate_ci(rb)  # sacrebleu's own summary of the same resamples
        assert math.isclose(fb, theirs[name].score, abs_tol=1e-4)
        # sacrebleu keeps its resampled scores in float32
        assert math.isclose(mean, theirs[name].mean, abs_tol=1e-4)
        assert math.isclose(ci, theirs[name].ci, abs_tol=1e-4)
        diffs = np.abs(rb - ra)
        assert _compute_p_value(diffs - diffs.mean(), abs(fb - fa)) == theirs[name].p_value
        low, high = np.percentile(rb - ra, [2.5, 97.5])
        m = cmp["metrics"][name]
        assert math.isclose(m["low"], low, abs_tol=1e-6) and math.isclose(m["high"], high,
                                                                             abs_tol=1e-6)
        assert math.isclose(m["diff"], fb - fa, abs_tol=1e-4)


def test_stored_statistics_equal_recomputed_ones() -> None:
    recs = _records(60)
    stats = row_statistics([r["prediction"] for r in recs], [r["reference"] for r in recs], "zh")
    stored = [{**r, **s} for r, s in zip(recs, stats, strict=True)]
    changed = [{**r, "prediction": r["reference"]} for r in recs]
    assert compare_records(stored, changed)["metrics"] == compare_records(recs, changed)["metrics"]


def test_too_few_shared_rows_and_different_test_sets() -> None:
    recs = _records(100)
    few = compare_records(recs[:29], [{**r, "prediction": ""} for r in recs[:29]])
    assert {m["verdict"] for m in few["metrics"].values()} == {S.TOO_FEW}
    # different test sets: compared on the 40 shared ids only, and the counts say so
    cmp = compare_records(recs[:70], recs[30:])
    assert (cmp["n_a"], cmp["n_b"], cmp["n_shared"]) == (70, 70, 40)
    flat = intervals_file(cmp)
    assert flat["n_shared"] == 40 and flat["bleu"]["verdict"] == S.NO_CHANGE
    with pytest.raises(ValueError, match=r"repeat ids \['row0'\]"):
        compare_records(recs + recs[:1], recs)


def test_interval_width_shrinks_as_one_over_sqrt_n() -> None:
    rng = np.random.default_rng(7)
    widths = {}
    for n in (50, 200, 800):
        a = rng.random(n)
        b = np.clip(a + rng.normal(0.05, 0.3, n), 0, 1)
        _, _, d = S.paired_mean(a, b, S.resample_indices(n))
        low, high = S.percentile_interval(d)
        widths[n] = high - low
    # 4x the rows -> half the width; 16x -> a quarter (sampling noise allowed)
    assert 1.6 < widths[50] / widths[200] < 2.5
    assert 3.2 < widths[50] / widths[800] < 5.0


def test_auc_and_macro_f1_match_scikit_learn() -> None:
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(3)
    for k in (2, 3, 5):
        gold = rng.integers(0, k, 300)
        probs = rng.random((300, k)).round(1) + np.eye(k)[gold] * 0.3  # ties, some signal
        probs /= probs.sum(1, keepdims=True)
        expected = (roc_auc_score(gold == 1, probs[:, 1]) if k == 2 else
                    roc_auc_score(gold, probs, multi_class="ovr", average="macro"))
        assert math.isclose(S.roc_auc(gold, probs, k), expected, abs_tol=1e-12)
        pred = rng.integers(0, k + 1, 300)  # k = matched no label
        assert math.isclose(S.macro_f1_codes(gold, pred, k),
                            f1_score(gold, pred, labels=list(range(k)), average="macro",
                                     zero_division=0), abs_tol=1e-12)
    assert math.isnan(S.roc_auc(np.zeros(10, dtype=int), np.full((10, 2), 0.5), 2))
    one = S.single_interval(lambda r: S.roc_auc(gold[r], probs[r], 5), 300)
    assert one["low"] < one["value"] < one["high"] and one["value"] > 0.6


def test_quantise_gate_identical_predictions_met_whatever_the_size() -> None:
    # scores near zero: a relative change of such a score is meaningless, the interval is not
    recs = [{**r, "prediction": "zzz" if i % 50 else r["reference"][:3]}
            for i, r in enumerate(_records(200))]
    same = json.loads(json.dumps(recs))
    gate = quantise_gate(recs, same, "rouge_l", 2.0)
    assert gate["gate"] == S.MET and gate["within_target"] is True
    assert (gate["ppl_loss_pct"], gate["ppl_loss_pct_high"], gate["main_loss_high"]) == (0, 0, 0)
    # one row of 200 changes a near-zero ROUGE-L by a large relative amount: still met
    tweaked = [dict(r) for r in same]
    tweaked[0]["prediction"] = "zzz"
    assert quantise_gate(recs, tweaked, "rouge_l", 2.0)["gate"] == S.MET
    blank = [{**r, "prediction": "", "nll": r["nll"] * 1.5} for r in _records(200)]
    missed = quantise_gate(_records(200), blank, "rouge_l", 2.0)
    assert missed["gate"] == S.MISSED and missed["ppl_loss_pct"] > 2
    assert quantise_gate(recs[:20], same[:20], "rouge_l", 2.0)["gate"] == S.TOO_FEW
    # NLL up 1% on every row: within 2% -> met; up 3% -> missed
    up1 = [{**r, "nll": r["nll"] * 1.01} for r in same]
    up3 = [{**r, "nll": r["nll"] * 1.03} for r in same]
    assert quantise_gate(recs, up1, "rouge_l", 2.0)["gate"] == S.MET
    assert quantise_gate(recs, up3, "rouge_l", 2.0)["gate"] == S.MISSED

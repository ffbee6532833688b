"""Metrics against hand-computed values (worked examples in the comments)."""

from __future__ import annotations

import math

import pytest

from reprotune.evaluate import metrics as M

# --------------------------------------------------------------------------- BLEU / chrF


def test_bleu_identical_is_100_english_and_chinese():
    out = M.bleu_chrf(["the cat sat on the mat", "猫坐在垫子上"],
                      ["the cat sat on the mat", "猫坐在垫子上"])
    assert out["bleu"] == pytest.approx(100.0)
    assert out["chrf"] == pytest.approx(100.0)


def test_bleu_english_partial_match_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (13a):
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> BP = 1
    # BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25
    out = M.bleu_chrf(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert out["tokenize"] == "13a"
    assert out["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)  # 53.728


def test_bleu_chinese_uses_zh_tokenizer_and_brevity_penalty_by_hand():
    # zh splits characters: hyp 6 chars, ref 7 chars, every hyp n-gram matches (p_n = 1),
    # so BLEU = 100 * BP = 100 * exp(1 - 7/6)
    out = M.bleu_chrf(["猫坐在垫子上"], ["猫坐在垫子上了"])
    assert out["tokenize"] == "zh"
    assert "tok:zh" in out["bleu_signature"]
    assert out["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-9)  # 84.648
    # 13a sees each Chinese sentence as a single token: no match at all
    assert M.bleu_chrf(["猫坐在垫子上"], ["猫坐在垫子上了"], tokenize="13a")["bleu"] == 0.0


def test_chrf_by_hand():
    # "ab" vs "abc": char 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2 (higher orders absent);
    # sacrebleu averages P and R over the 2 effective orders: P=1, R=7/12,
    # chrF(beta=2) = 5PR / (4P + R) = (35/12) / (55/12) = 7/11
    assert M.bleu_chrf(["ab"], ["abc"])["chrf"] == pytest.approx(700 / 11, abs=1e-9)


def test_auto_tokenize_rule_for_mixed_corpora():
    en, zh = "an english reference", "中文参考"
    assert M.resolve_bleu_tokenize([en] * 9 + [zh]) == "zh"  # 10 % CJK -> zh
    assert M.resolve_bleu_tokenize([en] * 10 + [zh]) == "13a"  # 9.1 % -> 13a
    assert M.resolve_bleu_tokenize(["", "  "]) == "13a"
    assert M.resolve_bleu_tokenize([zh], "intl") == "intl"


def test_bleu_empty_conventions():
    assert M.bleu_chrf([""], [""])["bleu"] == 100.0
    assert M.bleu_chrf([" "], [""])["chrf"] == 100.0
    assert M.bleu_chrf(["a b c d"], [""])["bleu"] == 0.0
    assert M.bleu_chrf([""], ["a b c d"])["bleu"] == 0.0
    assert M.sentence_bleu("", "", "13a") == 100.0
    assert M.sentence_bleu("x", "", "13a") == 0.0
    assert M.sentence_bleu("", "x", "zh") == 0.0
    assert M.sentence_bleu("猫坐在垫子上", "猫坐在垫子上", "zh") == pytest.approx(100.0)
    # an empty pair inside a corpus is neutral: same score as without it
    a = M.bleu_chrf(["the cat sat on the mat", ""], ["the cat sat on a mat", ""])["bleu"]
    assert a == pytest.approx(100 * (1 / 12) ** 0.25)
    with pytest.raises(ValueError, match="no rows"):
        M.bleu_chrf([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.bleu_chrf(["a", "b"], ["a"])


# --------------------------------------------------------------------------- ROUGE


def test_rouge_default_tokenizer_fails_on_chinese_and_ours_fixes_it():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    # rouge-score keeps only [a-z0-9]: Chinese text has no tokens, so even an identical
    # prediction scores 0, and a completely wrong one scores the same
    assert default.score("猫坐在垫子上", "猫坐在垫子上")["rouge1"].fmeasure == 0.0
    assert default.score("我喜欢苹果", "我讨厌苹果")["rougeL"].fmeasure == 0.0
    assert M.CJKTokenizer().tokenize("我喜欢Apple, 19个!") == ["我", "喜", "欢", "apple", "19", "个"]
    assert M.rouge(["猫坐在垫子上"], ["猫坐在垫子上"])["rouge1"] == pytest.approx(1.0)
    # 我喜欢苹果 vs 我讨厌苹果: 3 of 5 characters shared -> P = R = 3/5
    assert M.rouge(["我喜欢苹果"], ["我讨厌苹果"])["rouge1"] == pytest.approx(0.6)


def test_rouge_worked_examples():
    # English: "the cat sat on the mat" vs "the cat is on the mat"
    # R1: the x2, cat, on, mat = 5/6 both ways; R2: the-cat, on-the, the-mat = 3/5;
    # RL: LCS "the cat on the mat" = 5 -> 5/6
    en = M.rouge(["the cat sat on the mat"], ["The cat is on the mat."])
    assert en["rouge1"] == pytest.approx(5 / 6)
    assert en["rouge2"] == pytest.approx(3 / 5)
    assert en["rouge_l"] == pytest.approx(5 / 6)
    # Chinese: "猫坐在垫子上" (6) vs "猫坐在地上" (5): unigrams 猫坐在上 -> P 4/6 R 4/5,
    # F = 8/11; bigrams 猫坐 坐在 -> P 2/5 R 2/4, F = 4/9; LCS 猫坐在上 = 4 -> 8/11
    zh = M.rouge(["猫坐在垫子上"], ["猫坐在地上"])
    assert zh["rouge1"] == pytest.approx(8 / 11)
    assert zh["rouge2"] == pytest.approx(4 / 9)
    assert zh["rouge_l"] == pytest.approx(8 / 11)
    both = M.rouge(["the cat sat on the mat", "猫坐在垫子上"],
                   ["The cat is on the mat.", "猫坐在地上"])
    assert both["rouge_l"] == pytest.approx((5 / 6 + 8 / 11) / 2)
    assert len(both["per_sample"]) == 2


def test_rouge_empty_conventions():
    out = M.rouge(["", "...", "x", ""], ["", "", "", "y"])
    assert [s["rouge_l"] for s in out["per_sample"]] == [1.0, 1.0, 0.0, 0.0]
    assert out["rouge1"] == 0.5
    assert not any(math.isnan(v) for s in out["per_sample"] for v in s.values())


# --------------------------------------------------------------------------- token F1 / EM


def test_token_f1_worked_examples():
    # SQuAD normalisation drops the article: [cat, sat] vs [cat, sat, down]
    # P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert M.f1_em_single("the cat sat", "the cat sat down") == (pytest.approx(0.8), 0.0)
    # no articles: P = 3/3, R = 3/4, F1 = 2*(1*3/4)/(1+3/4) = 6/7
    assert M.f1_em_single("my cat sat", "my cat sat down")[0] == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: x x y vs x y y -> 2 common, P = R = 2/3
    assert M.f1_em_single("x x y", "x y y")[0] == pytest.approx(2 / 3)
    # Chinese, characters as tokens: 6 vs 5 chars, 4 shared -> 2*(4/6*4/5)/(4/6+4/5) = 8/11
    assert M.f1_em_single("猫坐在垫子上", "猫坐在地上")[0] == pytest.approx(8 / 11)
    # normalisation: case, punctuation (ASCII and Chinese), articles, fullwidth digits
    assert M.f1_em_single("The Answer: 19!", "answer 19") == (1.0, 1.0)
    assert M.f1_em_single("答案是１９。", "答案是 19") == (1.0, 1.0)
    assert M.answer_tokens("答案是19, the end") == ["答", "案", "是", "19", "end"]
    out = M.token_f1_em(["the cat sat", "answer 19"], ["the cat sat down", "Answer: 19"])
    assert out["f1"] == pytest.approx(0.9)
    assert out["em"] == pytest.approx(0.5)


def test_token_f1_empty_conventions():
    assert M.f1_em_single("", "") == (1.0, 1.0)
    assert M.f1_em_single("the", "a") == (1.0, 1.0)  # only articles: both tokenless
    assert M.f1_em_single("", "something") == (0.0, 0.0)
    assert M.f1_em_single("something", "   ") == (0.0, 0.0)


# --------------------------------------------------------------------------- classification


def test_classification_metrics_by_hand():
    preds = ["positive", "Negative.", "I think it's positive", "neutral", "不知道"]
    gold = ["positive", "negative", "negative", "negative", "positive"]
    out = M.classification_metrics(preds, gold)
    assert out["mapped"] == ["positive", "negative", "positive", "<other>", "<other>"]
    assert out["n_other"] == 2
    assert out["accuracy"] == pytest.approx(2 / 5)
    # negative: TP 1, FP 0, FN 2 -> F1 0.5; positive: TP 1, FP 1, FN 1 -> F1 0.5
    assert out["macro_f1"] == pytest.approx(0.5)
    assert out["confusion"]["labels"] == ["negative", "positive"]
    assert out["confusion"]["columns"] == ["negative", "positive", "<other>"]
    assert out["confusion"]["matrix"] == [[1, 1, 1], [0, 1, 1]]


def test_map_to_label_chinese_and_nested_labels():
    assert M.map_to_label("情感：正面", ["正面", "负面"]) == "正面"
    assert M.map_to_label("正面还是负面", ["正面", "负面"]) == "<other>"  # ambiguous
    assert M.map_to_label("It is not positive", ["positive", "not positive"]) == "not positive"
    assert M.map_to_label("positively", ["positive", "negative"]) == "<other>"  # whole words
    with pytest.raises(ValueError, match="not in the label set"):
        M.classification_metrics(["a"], ["b"], label_set=["a"])


# --------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def test_corpus_perplexity_matches_direct_cross_entropy(tiny_lm):
    import torch
    import torch.nn.functional as F

    rows = [  # different lengths (padding), prompt tokens masked with -100
        {"input_ids": [1, 5, 7, 9, 11, 13], "labels": [-100, -100, -100, 9, 11, 13]},
        {"input_ids": [2, 4, 6], "labels": [-100, 4, 6]},
        {"input_ids": [3, 8, 12, 16, 20, 24, 28, 30, 31], "labels": [-100] * 5 + [24, 28, 30, 31]},
        {"input_ids": [3, 8], "labels": [-100, -100]},  # nothing scored: skipped, counted
    ]
    total, count, per_row_ppl = 0.0, 0, []
    with torch.no_grad():
        for r in rows[:3]:  # one unpadded row at a time
            logits = tiny_lm(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            nll = F.cross_entropy(logits[:-1], torch.tensor(r["labels"][1:]), ignore_index=-100,
                                  reduction="sum").item()
            n = sum(x != -100 for x in r["labels"][1:])
            total, count = total + nll, count + n
            per_row_ppl.append(math.exp(nll / n))
    expected = math.exp(total / count)
    for bs in (1, 2, 4):
        out = M.corpus_perplexity(tiny_lm, rows, batch_size=bs, progress=False)
        assert out["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert out["n_tokens"] == count == 9
        assert out["n_rows"] == 3 and out["n_rows_without_tokens"] == 1
    # corpus perplexity is not the mean of per-row perplexities
    assert abs(expected - sum(per_row_ppl) / 3) > 1e-3


def test_corpus_perplexity_without_scored_tokens_is_an_error(tiny_lm):
    with pytest.raises(ValueError, match="no scored"):
        M.corpus_perplexity(tiny_lm, [{"input_ids": [1, 2], "labels": [-100, -100]}], 2,
                            progress=False)

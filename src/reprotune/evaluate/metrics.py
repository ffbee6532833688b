"""Evaluation metrics, each computed by its established library, made safe for Chinese text.

Scales: ``bleu`` and ``chrf`` are 0-100 (sacrebleu's convention, as BLEU is always quoted);
ROUGE, token F1/EM, accuracy and macro-F1 are 0-1. Perplexity is ``exp(mean token NLL)``.

Conventions for degenerate input (never NaN; "empty" means empty after stripping whitespace,
or, for token F1/EM, no tokens left after normalisation):

* prediction and reference both empty -> a perfect match: BLEU/chrF 100, ROUGE/F1/EM 1.0;
* exactly one of them empty -> no match: BLEU/chrF 0, ROUGE/F1/EM 0.0;
* corpus BLEU/chrF: empty pairs go to sacrebleu unchanged (an empty pair adds no n-grams and
  no length, so it is neutral); only a corpus whose pairs are *all* empty on both sides,
  which sacrebleu scores 0, is scored 100;
* an empty corpus (no rows) -> ``ValueError``.

CJK handling: ROUGE and token F1 treat every CJK ideograph / kana as one token (Chinese is
written without spaces, so whitespace tokenisation sees a whole sentence as one "word", and
rouge-score's default tokenizer, which keeps only ``[a-z0-9]``, deletes Chinese outright).
"""

from __future__ import annotations

import logging
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# CJK ideographs (unified, extension A, compatibility, supplementary planes), radicals, kana.
CJK_CHARS = ("\u2e80-\u2fdf\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
             "\U00020000-\U0002ffff")
_CJK_RE = re.compile(f"[{CJK_CHARS}]")
# A CJK character alone, or a run of word characters that are neither CJK nor "_".
_TOKEN_RE = re.compile(f"[{CJK_CHARS}]|[^\\W_{CJK_CHARS}]+")
# SQuAD strips ASCII punctuation; Unicode punctuation (，。！？「」) is stripped too, as in
# the MLQA / CMRC2018 evaluation scripts for Chinese.
_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")

# `auto` BLEU tokenisation picks sacrebleu's `zh` when at least this share of the non-empty
# references contains a CJK character, else `13a`. `zh` splits CJK characters and runs `13a`
# on everything else, so on English text it is `13a` but for two HTML-entity rules: a mixed
# corpus loses almost nothing by getting `zh`, while `13a` on Chinese treats a whole
# sentence as one token. Hence the low threshold.
ZH_MIN_CJK_SHARE = 0.10
OTHER_LABEL = "<other>"


def has_cjk(text: str) -> bool:
    """True when ``text`` contains a CJK ideograph or kana."""
    return bool(_CJK_RE.search(text))


def _blank(text: str) -> bool:
    return not text.strip()


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no rows to score (empty prediction and reference lists)")


# --------------------------------------------------------------------------- BLEU / chrF
def resolve_bleu_tokenize(refs: Sequence[str], tokenize: str = "auto") -> str:
    """The sacrebleu tokenizer for ``refs``: ``tokenize`` itself unless it is ``auto``."""
    if tokenize != "auto":
        return tokenize
    nonempty = [r for r in refs if not _blank(r)]
    if not nonempty:
        return "13a"
    share = sum(has_cjk(r) for r in nonempty) / len(nonempty)
    return "zh" if share >= ZH_MIN_CJK_SHARE else "13a"


def bleu_chrf(preds: Sequence[str], refs: Sequence[str], tokenize: str = "auto") -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu, one reference per prediction), both 0-100.

    Returns ``{"bleu", "chrf", "tokenize", "bleu_signature", "chrf_signature"}``; the
    signatures record every sacrebleu setting so scores can be reproduced.
    """
    from sacrebleu.metrics import BLEU, CHRF

    _check_pairs(preds, refs)
    tok = resolve_bleu_tokenize(refs, tokenize)
    bleu, chrf = BLEU(tokenize=tok), CHRF()
    b_score = bleu.corpus_score(list(preds), [list(refs)]).score
    c_score = chrf.corpus_score(list(preds), [list(refs)]).score
    if all(_blank(p) and _blank(r) for p, r in zip(preds, refs, strict=True)):
        b_score = c_score = 100.0  # all-empty corpus: identical, though sacrebleu says 0
    return {"bleu": float(b_score), "chrf": float(c_score), "tokenize": tok,
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def sufficient_stats(preds: Sequence[str], refs: Sequence[str], tokenize: str
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Per-row BLEU and chrF sufficient statistics (sacrebleu's own), whose column sums give
    the corpus scores: ``(bleu_stats, chrf_stats)``, one list of counts per row."""
    from sacrebleu.metrics import BLEU, CHRF

    _check_pairs(preds, refs)
    bleu = BLEU(tokenize=tokenize)._extract_corpus_statistics(list(preds), [list(refs)])
    chrf = CHRF()._extract_corpus_statistics(list(preds), [list(refs)])
    return ([[int(x) for x in row] for row in bleu], [[int(x) for x in row] for row in chrf])


def sentence_bleu(pred: str, ref: str, tokenize: str) -> float:
    """Sentence BLEU (sacrebleu defaults, exp smoothing), 0-100, with the empty conventions."""
    from sacrebleu.metrics import BLEU

    if _blank(pred) or _blank(ref):
        return 100.0 if _blank(pred) and _blank(ref) else 0.0
    return float(BLEU(tokenize=tokenize, effective_order=True).sentence_score(pred, [ref]).score)


# --------------------------------------------------------------------------- ROUGE
class CJKTokenizer:
    """rouge-score tokenizer: NFKC, lowercase, each CJK character a token, other text split
    into word-character runs (punctuation dropped, as rouge-score's default tokenizer does).
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F-measure (rouge-score with :class:`CJKTokenizer`), 0-1.

    Returns ``{"rouge1", "rouge2", "rouge_l", "per_sample": [{"rouge1", "rouge2",
    "rouge_l"}, ...]}``. A pair with no tokens on both sides scores 1.0, one side 0.0.
    """
    from rouge_score import rouge_scorer

    _check_pairs(preds, refs)
    tokenizer = CJKTokenizer()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    per_sample = []
    for pred, ref in zip(preds, refs, strict=True):
        p_empty, r_empty = not tokenizer.tokenize(pred), not tokenizer.tokenize(ref)
        if p_empty or r_empty:
            v = 1.0 if p_empty and r_empty else 0.0
            per_sample.append({"rouge1": v, "rouge2": v, "rouge_l": v})
            continue
        s = scorer.score(ref, pred)  # rouge-score's order is (target, prediction)
        per_sample.append({"rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure,
                           "rouge_l": s["rougeL"].fmeasure})
    n = len(per_sample)
    out: dict[str, Any] = {k: math.fsum(s[k] for s in per_sample) / n
                           for k in ("rouge1", "rouge2", "rouge_l")}
    out["per_sample"] = per_sample
    return out


# --------------------------------------------------------------------------- token F1 / EM
def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation (lowercase, strip punctuation and English articles,
    collapse whitespace), with Unicode punctuation also stripped and NFKC applied first."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (ch in _PUNCT or unicodedata.category(ch).startswith("P")) else ch
                   for ch in text)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of the normalised answer: whitespace words, with CJK characters split apart."""
    out: list[str] = []
    for word in normalize_answer(text).split():
        if has_cjk(word):
            out.extend(_TOKEN_RE.findall(word) or [word])
        else:
            out.append(word)
    return out


def f1_em_single(pred: str, ref: str) -> tuple[float, float]:
    """SQuAD token F1 and exact match of one pair (both tokenless -> 1.0, one -> 0.0)."""
    p, r = answer_tokens(pred), answer_tokens(ref)
    if not p or not r:
        v = float(p == r)
        return v, v
    common = sum((Counter(p) & Counter(r)).values())
    em = float(p == r)
    if common == 0:
        return 0.0, em
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall), em


def token_f1_em(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Mean SQuAD-style token F1 and exact match, 0-1, plus ``per_sample`` [(f1, em)]."""
    _check_pairs(preds, refs)
    per_sample = [f1_em_single(p, r) for p, r in zip(preds, refs, strict=True)]
    n = len(per_sample)
    return {"f1": math.fsum(f for f, _ in per_sample) / n,
            "em": math.fsum(e for _, e in per_sample) / n, "per_sample": per_sample}


# --------------------------------------------------------------------------- classification
def normalize_label(text: str) -> str:
    """Label comparison form: NFKC, lowercase, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _contains(haystack: str, needle: str) -> bool:
    if has_cjk(needle):  # no word boundaries in Chinese: plain substring
        return needle in haystack
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


def map_to_label(pred: str, label_set: Sequence[str]) -> str:
    """Map a generated answer to one label of ``label_set``, else :data:`OTHER_LABEL`.

    1. the normalised prediction equals a normalised label; else
    2. the normalised prediction contains labels (whole words; substrings for CJK labels):
       after dropping labels that are part of a longer matched label ("positive" inside
       "not positive"), exactly one must remain.
    """
    norm = {normalize_label(lab): lab for lab in label_set}
    p = normalize_label(pred)
    if p in norm:
        return norm[p]
    found = [n for n in norm if n and _contains(p, n)]
    found = [n for n in found if not any(n != m and n in m for m in found)]
    return norm[found[0]] if len(found) == 1 else OTHER_LABEL


def classification_metrics(preds: Sequence[str], labels: Sequence[str],
                           label_set: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 over the gold label set, and the confusion matrix (scikit-learn).

    Predictions are mapped with :func:`map_to_label`; unmatched ones become ``<other>``,
    are counted in ``n_other``, count as wrong, and get their own confusion-matrix column
    (not a class in macro-F1). Returns ``{"accuracy", "macro_f1", "n", "n_other",
    "mapped", "confusion": {"labels", "columns", "matrix"}}`` (rows = gold labels).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    _check_pairs(preds, labels)
    classes = sorted(set(label_set) if label_set is not None else set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {classes}")
    mapped = [map_to_label(p, classes) for p in preds]
    columns = [*classes, OTHER_LABEL]
    matrix = confusion_matrix(list(labels), mapped, labels=columns)[: len(classes)]
    return {
        "accuracy": float(accuracy_score(list(labels), mapped)),
        "macro_f1": float(f1_score(list(labels), mapped, labels=classes, average="macro",
                                   zero_division=0)),
        "n": len(mapped), "n_other": mapped.count(OTHER_LABEL), "mapped": mapped,
        "confusion": {"labels": classes, "columns": columns, "matrix": matrix.tolist()},
    }


# --------------------------------------------------------------------------- perplexity
# Logits of one forward pass are capped at this many floats (1 GiB in fp32): with a 152k
# vocabulary a batch of 32 x 384 tokens would otherwise need 7 GiB.
MAX_LOGIT_ELEMENTS = 2**28


class NonFiniteLossError(ValueError):
    """The model produced NaN/infinite losses: its weights are broken, not the data."""


MAX_MEAN_NLL = 700.0


def corpus_perplexity(model: Any, rows: Sequence[dict[str, Any]], batch_size: int, *,
                      pad_id: int = 0, progress: bool = True) -> dict[str, Any]:
    """Corpus perplexity under teacher forcing: ``exp(sum NLL / n scored tokens)``.

    ``rows`` carry ``input_ids`` and ``labels`` (HF convention: ``labels[t]`` is the target
    at position ``t``, the model predicts it from positions ``< t``; -100 = not scored, so
    prompts are excluded). Right padding with ``pad_id`` and ``-100`` labels excludes
    padding. Token NLLs are summed in float64. This is NOT the mean of per-row
    perplexities, which would over-weight short answers.

    Returns ``{"perplexity", "nll", "n_tokens", "n_rows", "n_rows_without_tokens",
    "row_nll", "row_tokens"}`` (the last two per input row, in row order: summed NLL in nats
    and scored tokens, 0 for a row without any); raises ``ValueError`` when no row has a
    scored token.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    scored = [sum(1 for x in r["labels"][1:] if x != -100) for r in rows]
    order = sorted((i for i in range(len(rows)) if scored[i] > 0),
                   key=lambda i: (-len(rows[i]["input_ids"]), i))
    if not order:
        raise ValueError(f"no scored (assistant) tokens in {len(rows)} rows: perplexity undefined")
    total_nll, total_tokens = 0.0, 0
    row_nll, row_tokens = [0.0] * len(rows), [0] * len(rows)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc="perplexity", unit="row", disable=not progress)
    with torch.inference_mode():
        start = 0
        while start < len(order):
            longest = len(rows[order[start]]["input_ids"])
            n = max(1, min(batch_size, MAX_LOGIT_ELEMENTS // max(1, longest * vocab)))
            batch = order[start:start + n]
            start += len(batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            lab = torch.full((len(batch), longest), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for j, i in enumerate(batch):
                k = len(rows[i]["input_ids"])
                ids[j, :k] = torch.as_tensor(rows[i]["input_ids"])
                lab[j, :k] = torch.as_tensor(rows[i]["labels"])
                mask[j, :k] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits[:, -longest:]  # prompt/prefix tuning may prepend virtual tokens
            targets = lab[:, 1:].to(device)
            keep = targets != -100
            picked = logits[:, :-1][keep].float()  # only scored positions reach log_softmax
            logp = torch.log_softmax(picked, dim=-1).gather(1, targets[keep].unsqueeze(1))
            total_nll -= float(logp.double().sum())
            total_tokens += int(keep.sum())
            which = keep.nonzero()[:, 0].cpu()  # batch position of each scored token
            per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(
                0, which, logp.squeeze(1).double().cpu())
            for j, i in enumerate(batch):
                row_nll[i], row_tokens[i] = -float(per_row[j]), scored[i]
            del logits, picked, logp
            bar.update(len(batch))
    bar.close()
    model.train(was_training)
    nll = total_nll / total_tokens
    # A mean NLL above ~700 nats overflows exp(); no working model gets near it (uniform
    # guessing over 152k tokens is 11.9), so it means broken weights, like NaN/inf does.
    if not math.isfinite(nll) or nll > MAX_MEAN_NLL:
        raise NonFiniteLossError(f"mean loss over {total_tokens} assistant tokens is {nll:.6g}: "
                                 f"the model's outputs are not finite")
    return {"perplexity": math.exp(nll), "nll": nll, "n_tokens": total_tokens,
            "n_rows": len(order), "n_rows_without_tokens": len(rows) - len(order),
            "row_nll": row_nll, "row_tokens": row_tokens}

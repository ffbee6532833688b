"""The model's probability of each label, for ROC-AUC on classification rows.

Each label is scored as an answer: the summed log-probability of its tokens right after the
rendered prompt (the assistant generation prompt, exactly as generation sees it), under
teacher forcing. A softmax over the label set turns those scores into one probability per
label, the scores ROC-AUC ranks rows by (scikit-learn's one-vs-rest needs rows summing to 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

DIGITS = 6


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label's text; a label that encodes to nothing is an error."""
    out = [tokenizer(str(lab), add_special_tokens=False)["input_ids"] for lab in labels]
    empty = [lab for lab, ids in zip(labels, out, strict=True) if not ids]
    if empty:
        raise ValueError(f"labels {empty} encode to no tokens: they cannot be scored")
    return out


def label_logprobs(model: Any, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                   *, batch_size: int, pad_id: int = 0) -> list[list[float]]:
    """``[row][label]`` summed log-probability of the label tokens after each prompt."""
    import torch

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqs: list[tuple[int, int, list[int], int]] = []  # (row, label, ids, prompt length)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            keep = list(p)
            if limit and len(keep) + len(lab) > limit:  # the end holds the question
                keep = keep[len(keep) + len(lab) - limit:]
            seqs.append((i, j, keep + list(lab), len(keep)))
    out = [[0.0] * len(labels) for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(s[2]) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(chunk):  # right padding: positions start at 0
                ids[r, :len(seq)] = torch.as_tensor(seq)
                mask[r, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits[:, -width:]  # prompt/prefix tuning may prepend virtual tokens
            for r, (i, j, seq, plen) in enumerate(chunk):
                # position t predicts token t + 1: label tokens sit at plen .. len(seq) - 1
                pred = logits[r, plen - 1:len(seq) - 1].float()
                target = torch.as_tensor(seq[plen:], device=pred.device)
                logp = torch.log_softmax(pred, dim=-1).gather(1, target.unsqueeze(1))
                out[i][j] = float(logp.double().sum())
            del logits
    model.train(was_training)
    return out


def to_probabilities(logprobs: Sequence[Sequence[float]], labels: Sequence[str]
                     ) -> list[dict[str, float]]:
    """Softmax over each row's label scores -> ``{label: probability}`` (rounded)."""
    out = []
    for row in logprobs:
        top = max(row)
        w = [math.exp(x - top) for x in row]
        total = math.fsum(w)
        out.append({lab: round(x / total, DIGITS) + 0.0 for lab, x in zip(labels, w, strict=True)})
    return out


def label_probabilities(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                        labels: Sequence[str], *, batch_size: int) -> list[dict[str, float]]:
    """``{label: probability}`` per rendered prompt (token ids), over ``labels``."""
    if not prompts:
        return []
    ids = label_token_ids(tokenizer, labels)
    lp = label_logprobs(model, prompts, ids, batch_size=batch_size,
                        pad_id=tokenizer.pad_token_id or 0)
    return to_probabilities(lp, labels)


def probabilities_and_auc(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                          gold: Sequence[str], classes: Sequence[str], *, batch_size: int
                          ) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """(label probabilities per row, ``{auc, auc_low, auc_high}``): ROC-AUC of the gold
    labels with its 95% bootstrap interval; ``{}`` when it is undefined (one class)."""
    import numpy as np

    from reprotune.evaluate import significance as S

    probs = label_probabilities(model, tokenizer, prompts, classes, batch_size=batch_size)
    if len(classes) < 2:
        log.warning("one label class in the test split: ROC-AUC is undefined")
        return probs, {}
    code = {c: k for k, c in enumerate(classes)}
    y = np.array([code[g] for g in gold])
    q = np.array([[p[c] for c in classes] for p in probs])
    auc = S.single_interval(lambda rows: S.roc_auc(y[rows], q[rows], len(classes)), len(y))
    if auc["value"] is None:
        return probs, {}
    return probs, {"auc": auc["value"], "auc_low": auc["low"], "auc_high": auc["high"]}

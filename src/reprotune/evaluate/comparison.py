"""Base against fine-tuned: the gains of two :func:`reprotune.evaluate.evaluation.evaluate_model`
metric dicts, the eval.json / eval_gain.json contents, and the finiteness check the evaluate
stage applies before writing them."""

from __future__ import annotations

import logging
import math
from typing import Any

from reprotune.evaluate.evaluation import _round

log = logging.getLogger(__name__)

# Headline metrics, higher is better; perplexity is handled apart (lower is better).
HEADLINE = ("bleu", "chrf", "rouge1", "rouge2", "rouge_l", "f1", "em", "accuracy", "macro_f1",
            "auc")
# Settings that must agree for a base-vs-fine-tuned comparison to mean anything.
COMPARABLE_SETTINGS = ("n_rows", "bleu_tokenize", "max_new_tokens", "do_sample", "task")


def _numbers(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare(finetuned: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``{"finetuned": {...}, "base": {...}, "gain": {...}}`` of two :func:`evaluate_model`
    metric dicts. ``gain[m] = finetuned - base`` for the higher-is-better metrics, and
    ``gain["ppl_reduction"] = base - finetuned`` perplexity, so positive gain is always
    better; ``tasks``: each task's gain, when both hold a mixture's tasks. Settings that
    must agree but differ are listed in ``settings_mismatch``.
    """
    ft, bs = _numbers(finetuned), _numbers(base)
    gain = {k: _round(ft[k] - bs[k]) for k in HEADLINE if k in ft and k in bs}
    if "perplexity" in ft and "perplexity" in bs:
        gain["ppl_reduction"] = _round(bs["perplexity"] - ft["perplexity"])
    out: dict[str, Any] = {"finetuned": ft, "base": bs, "gain": gain}
    if tasks := {t: compare(m, base["tasks"][t])["gain"] for t, m in
                 finetuned.get("tasks", {}).items() if t in (base.get("tasks") or {})}:
        out["tasks"] = tasks  # a mixture: each task's gain too
    s_ft, s_bs = finetuned.get("settings", {}), base.get("settings", {})
    mismatch = [k for k in COMPARABLE_SETTINGS if s_ft.get(k) != s_bs.get(k)] if base else []
    if mismatch:
        log.warning("base and fine-tuned evaluations differ in %s: the gain is not like for like",
                    ", ".join(f"{k} ({s_bs.get(k)!r} vs {s_ft.get(k)!r})" for k in mismatch))
        out["settings_mismatch"] = mismatch
    return out


def metrics_file(finetuned: dict[str, Any], comparison: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(eval.json, eval_gain.json)`` contents. eval.json holds the fine-tuned values and
    settings only; the base values live in eval_base.json and the gains in their own small
    file, so ``dvc metrics diff`` shows each number once."""
    out = {k: v for k, v in finetuned.items() if k != "confusion"}
    gain: dict[str, Any] = {"gain": comparison["gain"]}
    if "settings_mismatch" in comparison:
        out["settings_mismatch"] = gain["settings_mismatch"] = comparison["settings_mismatch"]
    return out, gain


def is_finite_metrics(m: dict[str, Any]) -> bool:
    """True when no number in ``m`` (nested dicts included) is NaN or infinite."""
    return all(is_finite_metrics(v) if isinstance(v, dict) else
               not (isinstance(v, float) and not math.isfinite(v)) for v in m.values())

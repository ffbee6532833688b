"""Evaluate a model on the test split: generation, every metric, per-sample records.

Each test row is answered from its conversation up to (not including) its LAST assistant
turn; that turn is the reference. Generation metrics (BLEU, chrF, ROUGE, token F1/EM) are
always computed; classification metrics are added when the task is ``classification``, or
``auto`` and some rows carry a label (scored on those rows). Perplexity is computed with
teacher forcing when the rows carry the tokenised ``input_ids``/``labels`` columns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.evaluate import metrics as M
from reprotune.evaluate.generation import generate_detailed, render_prompts, strip_think
from reprotune.evaluate.tasks import TASK, task_metrics

log = logging.getLogger(__name__)

DIGITS = 6


class EvalDataError(ValueError):
    """The test split cannot be evaluated; the message names the file, row and field."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[dict[str, Any]]
    tools: list[Any] | None
    reference: str
    user: str
    label: str | None
    task: str | None = None  # a mixture's task (ingest.mixture), else None


def _json_field(row: dict[str, Any], name: str, where: str) -> Any:
    value = row.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{where}: field {name!r} is not valid JSON: {exc.msg}") from exc
    return value


def reference_text(message: dict[str, Any]) -> str:
    """The answer text of an assistant message as the Qwen3 template renders it: content
    (without any think block), then one ``<tool_call>`` block per tool call."""
    parts = [strip_think(message.get("content") or "")]
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        parts.append(f'<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {args}}}\n</tool_call>')
    return "\n".join(p for p in parts if p)


def parse_row(row: dict[str, Any], index: int, source: str) -> Example:
    """One test row -> :class:`Example`; errors name ``source``, the 1-based row and field."""
    where = f"{source}: row {index + 1} (id {row.get('id', '?')})"
    if row.get("messages") is None and row.get("input_ids") is not None:
        raise EvalDataError(f"{where}: a packed text row (format.mode: text, continued "
                            f"pretraining) has no question and answer to generate and score "
                            f"(the eval stages score text rows by perplexity); run the "
                            f"pretraining up to `dvc repro evaluate merge`, then fine-tune on "
                            f"conversations from the merged model (docs/training.md, "
                            f"\"Continued pretraining, then SFT\")")
    messages = _json_field(row, "messages", where)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise EvalDataError(f"{where}: field 'messages' must be a list of message objects")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise EvalDataError(f"{where}: field 'messages' has no assistant turn, so there is no "
                            f"reference answer to evaluate against")
    if last == 0:
        raise EvalDataError(f"{where}: field 'messages' starts with the assistant turn: no prompt")
    tools = _json_field(row, "tools", where)
    user = next((m.get("content") or "" for m in reversed(messages[:last])
                 if m.get("role") == "user"), "")
    label, task = row.get("label"), row.get(TASK)
    return Example(id=str(row.get("id", index)), prompt=messages[:last], tools=tools or None,
                   reference=reference_text(messages[last]), user=user,
                   label=None if label in (None, "") else str(label),
                   task=None if task is None else str(task))


def load_test_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read the test split; fail naming the file when it is missing or empty."""
    path = Path(path)
    if not path.exists():
        raise EvalDataError(f"{path}: test split not found (run the split stage first)")
    rows = io.read_jsonl(path) if path.suffix == ".jsonl" else io.read_parquet(path)
    if not rows:
        raise EvalDataError(f"{path}: test split has no rows")
    return rows


def resolve_max_new_tokens(setting: int | str, tokenizer: Any, references: Sequence[str]) -> int:
    """``eval.max_new_tokens``: a number as given; ``auto`` = the p95 of the references'
    token lengths plus one for the end-of-turn token (at least 1)."""
    import numpy as np

    if setting != "auto":
        return int(setting)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    if not lengths:
        return 1
    return int(math.ceil(float(np.percentile(np.asarray(lengths, dtype=np.float64), 95)))) + 1


def _round(x: Any) -> Any:
    # + 0.0 turns -0.0 into 0.0: a "-0.0" row in `dvc metrics diff` is noise
    return round(x, DIGITS) + 0.0 if isinstance(x, float) else x


def evaluate_model(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: Any, *,
                   enable_thinking: bool, seed: int, source: str = "test split",
                   progress: bool = True, shard: tuple[int, int] = (0, 1),
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate answers for ``rows`` and score them; ``cfg`` is the ``eval`` params section.

    Returns ``(metrics, predictions)``: metrics hold the headline numbers, counts, a
    ``settings`` dict and (classification) a ``confusion`` dict; predictions hold one
    record per row, in row order: ``{id, prompt, reference, prediction, label, bleu,
    rouge_l, f1, em}`` plus the per-row statistics every metric is computed from
    (``bleu_stats``, ``chrf_stats``, ``rouge1``, ``rouge2``; ``nll``, ``n_tokens`` with
    perplexity; ``pred_label`` and ``label_probs`` with classification), so two prediction
    files can be compared (:mod:`reprotune.evaluate.paired`) without the model. Rows that
    carry a mixture's ``task`` give records with ``task`` and metrics with ``tasks``, each
    task's metrics (:func:`reprotune.evaluate.tasks.task_metrics`).

    ``shard = (rank, processes)`` generates data-parallel (``eval.num_processes``): every
    process generates its share of the batches, and rank 0 alone scores (the others return
    empty results).
    """
    rows = list(rows[: cfg.max_rows] if cfg.max_rows else rows)
    if not rows:
        raise EvalDataError(f"{source}: no rows to evaluate")
    examples = [parse_row(r, i, source) for i, r in enumerate(rows)]
    labelled = [i for i, e in enumerate(examples) if e.label is not None]
    if cfg.task == "classification" and not labelled:
        raise EvalDataError(f"{source}: eval.task is classification but no row has a label")
    classify = cfg.task == "classification" or (cfg.task == "auto" and bool(labelled))

    refs = [e.reference for e in examples]
    max_new = resolve_max_new_tokens(cfg.max_new_tokens, tokenizer, refs)
    preds, capped = generate_detailed(
        model, tokenizer, [e.prompt for e in examples], [e.tools for e in examples],
        max_new_tokens=max_new, batch_size=cfg.batch_size, enable_thinking=enable_thinking,
        do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
        progress=progress, shard=shard)
    if shard[0] > 0:  # scoring and perplexity are rank 0's
        return {}, []
    capped_share = sum(capped) / len(capped)
    cap_warning = capped_share > getattr(cfg, "warn_capped", 1.0)
    if cap_warning:
        log.warning("GENERATION CAP: %d of %d answers (%.0f%%) stopped at eval.max_new_tokens=%d "
                    "before the end of their turn; scores of cut answers are meaningless. Raise "
                    "eval.max_new_tokens or use `auto`.", sum(capped), len(capped),
                    100 * capped_share, max_new)
    bc = M.bleu_chrf(preds, refs, cfg.bleu_tokenize)
    rg = M.rouge(preds, refs)
    tf = M.token_f1_em(preds, refs)
    out: dict[str, Any] = {"bleu": bc["bleu"], "chrf": bc["chrf"], "rouge1": rg["rouge1"],
                           "rouge2": rg["rouge2"], "rouge_l": rg["rouge_l"], "f1": tf["f1"],
                           "em": tf["em"], "n_rows": len(rows),
                           "n_empty_predictions": sum(not p.strip() for p in preds),
                           "n_capped_predictions": sum(capped),
                           "capped_share": round(capped_share, 4), "cap_warning": cap_warning}
    bleu_stats, chrf_stats = M.sufficient_stats(preds, refs, bc["tokenize"])
    records = [{"id": e.id, "prompt": e.user, "reference": e.reference, "prediction": p,
                "label": e.label, "capped": cap,
                "bleu": _round(M.sentence_bleu(p, e.reference, bc["tokenize"])),
                "rouge_l": _round(r["rouge_l"]), "f1": _round(f), "em": _round(em),
                "rouge1": _round(r["rouge1"]), "rouge2": _round(r["rouge2"]),
                "bleu_stats": bs, "chrf_stats": cs}
               for e, p, cap, r, (f, em), bs, cs in zip(
                   examples, preds, capped, rg["per_sample"], tf["per_sample"], bleu_stats,
                   chrf_stats, strict=True)]
    if classify:
        cm = M.classification_metrics([preds[i] for i in labelled],
                                      [examples[i].label for i in labelled])
        out.update(accuracy=cm["accuracy"], macro_f1=cm["macro_f1"], n_labelled=len(labelled),
                   n_other=cm["n_other"], confusion=cm["confusion"])
        for i, mapped in zip(labelled, cm["mapped"], strict=True):
            records[i]["pred_label"] = mapped
        out.update(_label_probs_and_auc(model, tokenizer, examples, labelled, records,
                                        cm["confusion"]["labels"], cfg.batch_size,
                                        enable_thinking))
    row_ppl: list[dict[str, Any]] = [{}] * len(rows)
    if all("input_ids" in r and "labels" in r for r in rows):
        ppl = _perplexity(model, tokenizer, rows, cfg.batch_size, source, progress)
        row_ppl = [{"nll": nll, "n_tokens": n_tok}
                   for nll, n_tok in zip(ppl.pop("row_nll"), ppl.pop("row_tokens"), strict=True)]
        for rec, r in zip(records, row_ppl, strict=True):
            rec.update(nll=_round(r["nll"]), n_tokens=r["n_tokens"])
        out.update(ppl)
    else:
        log.warning("%s: rows lack input_ids/labels: perplexity not computed", source)
    if any(e.task is not None for e in examples):  # a mixture: every metric per task too
        for rec, e in zip(records, examples, strict=True):
            rec[TASK] = e.task
        out["tasks"] = task_metrics([{**rec, **r} for rec, r in zip(records, row_ppl, strict=True)],
                                    tokenize=bc["tokenize"], classify=classify)
    out["settings"] = {
        "task": cfg.task, "classification": classify, "bleu_tokenize": bc["tokenize"],
        "bleu_signature": bc["bleu_signature"], "chrf_signature": bc["chrf_signature"],
        "n_rows": len(rows), "max_rows": cfg.max_rows, "max_new_tokens": max_new,
        "max_new_tokens_setting": cfg.max_new_tokens,
        "batch_size": cfg.batch_size, "do_sample": cfg.do_sample,
        "temperature": cfg.temperature if cfg.do_sample else None,
        "top_p": cfg.top_p if cfg.do_sample else None, "seed": seed,
        "enable_thinking": enable_thinking}
    return {k: _round(v) for k, v in out.items()}, records


def _perplexity(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int,
                source: str, progress: bool) -> dict[str, Any]:
    vocab = int(model.get_output_embeddings().weight.shape[0])
    for i, r in enumerate(rows):
        if len(r["input_ids"]) != len(r["labels"]):
            raise EvalDataError(f"{source}: row {i + 1}: fields 'input_ids' and 'labels' differ "
                                f"in length ({len(r['input_ids'])} vs {len(r['labels'])})")
        if r["input_ids"] and max(r["input_ids"]) >= vocab:
            raise EvalDataError(f"{source}: row {i + 1}: field 'input_ids' holds id "
                                f"{max(r['input_ids'])} >= the model's vocabulary ({vocab}): "
                                f"the split was tokenised with another tokenizer")
    try:
        ppl = M.corpus_perplexity(model, rows, batch_size, pad_id=tokenizer.pad_token_id or 0,
                                  progress=progress)
    except M.NonFiniteLossError:
        raise  # broken weights, not bad data: the stage names the model folder
    except ValueError as exc:
        raise EvalDataError(f"{source}: {exc} (every assistant turn was masked or truncated)") from exc
    return {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "ppl_tokens": ppl["n_tokens"],
            "ppl_rows_without_tokens": ppl["n_rows_without_tokens"],
            "row_nll": ppl["row_nll"], "row_tokens": ppl["row_tokens"]}


def _label_probs_and_auc(model: Any, tokenizer: Any, examples: Sequence[Example],
                         labelled: Sequence[int], records: list[dict[str, Any]],
                         classes: Sequence[str], batch_size: int, enable_thinking: bool,
                         ) -> dict[str, Any]:
    """Store each labelled row's label probabilities; ROC-AUC with its 95% interval."""
    from reprotune.evaluate.label_scores import probabilities_and_auc

    prompts = render_prompts(tokenizer, [examples[i].prompt for i in labelled],
                             [examples[i].tools for i in labelled],
                             enable_thinking=enable_thinking)
    probs, auc = probabilities_and_auc(model, tokenizer, prompts,
                                       [examples[i].label for i in labelled], classes,
                                       batch_size=batch_size)
    for i, p in zip(labelled, probs, strict=True):
        records[i]["label_probs"] = p
    return auc

"""Truncate rendered rows to ``format.max_length``, count what happened, build the table.

The format step has two halves. :mod:`reprotune.data.rendering` renders, tokenises and masks
each record on its own (full length, nothing cut). Here, once every row's full length is
known, ``format.max_length`` is resolved (``auto``: the p99 of the lengths), rows are cut to
it, rows that lose every assistant token are dropped, and the statistics are computed. This
half works on Arrow tables read batch by batch (:func:`cut_tables`) and on numpy columns
(:func:`plan`), so the stage (:mod:`reprotune.data.format_stream`) never holds the rows as
Python objects; :func:`format_records` runs both halves on a list of records in memory.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from reprotune import markup
from reprotune.data.mixture import TASK_FIELD
from reprotune.data.rendering import (
    CANONICAL_FIELDS,
    DROP_TEMPLATE,
    DROP_TURNS,
    DROP_UNDESIRABLE,
    IGNORE_INDEX,
    Renderer,
)

log = logging.getLogger(__name__)

DROP_TRUNCATED = "no_label_tokens_after_truncation"
DROP_REASONS = (markup.REASON, DROP_TEMPLATE, DROP_TURNS, DROP_TRUNCATED, DROP_UNDESIRABLE)
# the per-row columns the plan reads (small: no text, no tokens)
SUMMARY_FIELDS = ("id", "source", "reason", "detail", "n_full", "first_label",
                  "decode_mismatch", "span_mismatch", "turns", "masked_turns")
CUT_FIELDS = CANONICAL_FIELDS + ("text", "input_ids", "labels", "n_full")
# reads the given columns of the rendered rows, in row order, as Arrow tables
Batches = Callable[[Sequence[str]], Iterator[Any]]


class FormatError(ValueError):
    """The data cannot be formatted with these params; the message names the param."""


def _length_stats(values: Sequence[int] | np.ndarray) -> dict[str, float]:
    if not len(values):
        return {k: 0 for k in ("min", "mean", "p50", "p90", "p99", "max")}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (round(float(x), 3) for x in np.percentile(arr, [50, 90, 99]))
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 3), "p50": p50,
            "p90": p90, "p99": p99, "max": int(arr.max())}


def resolve_max_length(setting: int | str, lengths: Sequence[int] | np.ndarray,
                       model_limit: int | None) -> int:
    """``format.max_length``: a number as given; ``auto`` = the p99 of the rendered lengths
    (rounded up), capped by the model's context length. Neither is ever above the model limit."""
    if setting != "auto":
        value = int(setting)
    elif len(lengths):
        value = int(math.ceil(float(np.percentile(np.asarray(lengths, dtype=np.float64), 99))))
    else:
        value = model_limit or 1
    return min(value, model_limit) if model_limit else value


def truncation_fix(setting: int | str, limit: int, model_limit: int | None,
                   p99: float) -> str:
    """What to do about truncated rows, for the limit they were cut at and where it came from:
    raising ``format.max_length`` helps only below the model's own limit, and ``auto`` is only
    advice when it is not already the setting."""
    if model_limit and limit >= model_limit:
        return (f"The limit is the model's own context length ({model_limit} tokens, "
                f"{'auto' if setting == 'auto' else 'format.max_length'} is capped there): "
                f"shorten or split these rows, or use a model with a longer context.")
    cap = f" (at most the model's {model_limit})" if model_limit else ""
    if setting == "auto":
        return (f"format.max_length: auto gave {limit} (the p99 of the rows it was computed "
                f"from); to keep these rows whole set a number near {math.ceil(p99)}{cap}.")
    return f"Raise format.max_length (now {limit}) to about {math.ceil(p99)}{cap} or use `auto`."


@dataclass
class Plan:
    """What truncation does to each input row; ``stats`` is complete once the rows are cut."""

    limit: int
    keep: np.ndarray       # bool per input row: written to the table
    lengths: np.ndarray    # full token length of each rendered row, in order (for the plot)
    stats: dict[str, Any]
    summary: Any           # the SUMMARY_FIELDS columns (pyarrow.Table)


def plan(summary: Any, *, max_length: int | str, enable_thinking: bool,
         model_limit: int | None = None, warn_truncated: float = 0.05,
         train_reasoning: bool = True) -> Plan:
    """Resolve the length limit from the rows' full lengths and decide every row's fate.

    Raises :class:`FormatError` naming ``format.max_length`` when more than half of the
    rendered rows would lose every assistant token.
    """
    import pyarrow.compute as pc

    reason = summary.column("reason")
    rendered = ~np.asarray(reason.is_valid(), dtype=bool)
    n_full = summary.column("n_full").to_numpy()
    first = summary.column("first_label").to_numpy()
    lengths = n_full[rendered]
    limit = resolve_max_length(max_length, lengths, model_limit)
    no_label = rendered & ((first < 0) | (first >= limit))
    keep = rendered & ~no_label
    n_rendered, n_no_label = int(rendered.sum()), int(no_label.sum())
    n_truncated = int((rendered & (n_full > limit)).sum())
    if n_rendered and n_no_label * 2 > n_rendered:
        raise FormatError(
            f"format.max_length: {limit} leaves no assistant token in {n_no_label} of "
            f"{n_rendered} rows (their prompts are longer; median length "
            f"{_length_stats(lengths)['p50']:g} tokens); use `auto` or a larger value")
    decode_mismatch = int(np.asarray(summary.column("decode_mismatch")).sum())
    span_mismatch = int(np.asarray(summary.column("span_mismatch")).sum())
    if decode_mismatch or span_mismatch:
        log.warning("%d rows decode differently from their text, %d label spans differ from "
                    "their text (a normalising tokenizer?)", decode_mismatch, span_mismatch)
    share = n_truncated / n_rendered if n_rendered else 0.0
    warning = share > warn_truncated
    if warning:
        p99 = _length_stats(lengths)["p99"]
        log.warning("TRUNCATION: %d of %d rows (%.1f%%) are longer than the limit of %d tokens "
                    "and lose their end (%d lose every assistant token); p99 length is %s. %s",
                    n_truncated, n_rendered, 100 * share, limit, n_no_label, p99,
                    truncation_fix(max_length, limit, model_limit, p99))
    reasons = Counter({c["values"]: c["counts"] for c in pc.value_counts(reason.drop_null()).to_pylist()})
    reasons[DROP_TRUNCATED] += n_no_label
    rows_out = int(keep.sum())
    stats = {
        "rows_in": summary.num_rows, "rows_out": rows_out,
        "dropped": {k: reasons.get(k, 0) for k in DROP_REASONS},
        "rows_dropped": summary.num_rows - rows_out, "truncated": n_truncated,
        "truncated_share": round(share, 4), "truncation_warning": warning,
        "max_length": limit, "max_length_setting": max_length, "model_limit": model_limit,
        "enable_thinking": enable_thinking, "train_reasoning": train_reasoning,
        "assistant_turns": int(np.asarray(summary.column("turns")).sum()),
        # assistant turns left unlabelled by their message's loss_weight: 0
        "loss_weight_masked_turns": int(np.asarray(summary.column("masked_turns")).sum()),
        "token_length": _length_stats(lengths),
        "tokens_out": int(np.minimum(n_full[keep], limit).sum()),
        "label_tokens": 0,  # counted by cut_tables
        "decode_mismatch": decode_mismatch, "label_span_mismatch": span_mismatch,
    }
    assert stats["rows_in"] == stats["rows_out"] + sum(stats["dropped"].values())
    return Plan(limit, keep, lengths, stats, summary)


def dropped_rows(p: Plan) -> Iterator[dict[str, Any]]:
    """Every dropped row (id, source, reason, detail): the rows the template step refused,
    in input order, then the rows left without an assistant token, in input order."""
    refused = np.asarray(p.summary.column("reason").is_valid(), dtype=bool)
    yield from p.summary.select(["id", "source", "reason", "detail"]).take(
        np.flatnonzero(refused)).to_pylist()
    gone = np.flatnonzero(~refused & ~p.keep)
    n_full = p.summary.column("n_full").to_numpy()[gone]
    for row, n in zip(p.summary.select(["id", "source"]).take(gone).to_pylist(), n_full,
                      strict=True):
        yield {**row, "reason": DROP_TRUNCATED,
               "detail": f"{n} tokens, cut at {p.limit}: no assistant token left"}


def cut_tables(batches: Batches, p: Plan, tasks: bool = False) -> Iterator[Any]:
    """The kept rows, cut to ``p.limit`` tokens, as tables of :func:`formatted_schema`,
    one per batch of ``batches``; adds their label tokens to ``p.stats``. ``tasks``: the
    rendered rows carry a mixture's ``task`` column, kept after ``meta``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema, start = formatted_schema(tasks), 0
    canonical = CANONICAL_FIELDS + ((TASK_FIELD,) if tasks else ())
    for batch in batches(CUT_FIELDS + ((TASK_FIELD,) if tasks else ())):
        keep = p.keep[start:start + batch.num_rows]
        start += batch.num_rows
        t = batch.filter(pa.array(keep)).combine_chunks()
        if not t.num_rows:
            continue
        ids = pc.list_slice(t.column("input_ids"), 0, p.limit).combine_chunks()
        labels = pc.list_slice(t.column("labels"), 0, p.limit).combine_chunks()
        values = pc.list_flatten(labels).to_numpy()
        parents = pc.list_parent_indices(labels).to_numpy()
        n_label = np.bincount(parents[values != IGNORE_INDEX], minlength=t.num_rows)
        p.stats["label_tokens"] += int(n_label.sum())
        cols = {k: t.column(k) for k in canonical + ("text",)}
        cols.update(input_ids=ids, labels=labels,
                    n_tokens=pc.list_value_length(ids).cast(pa.int32()),
                    n_label_tokens=pa.array(n_label, pa.int32()),
                    truncated=pc.greater(t.column("n_full"), p.limit))
        yield pa.table(cols, schema=schema)


def combine_stats(stats: Mapping[str, dict[str, Any]], lengths: np.ndarray, *,
                  limit_from: str, warn_truncated: float) -> dict[str, Any]:
    """One ``metrics/format.json`` for several splits' :attr:`Plan.stats`: the totals at the
    top level (``token_length`` over every rendered row), each split's counts under ``splits``."""
    first = next(iter(stats.values()))
    total = {k: sum(s[k] for s in stats.values()) for k in _SUMMED}
    rendered = len(lengths)
    share = total["truncated"] / rendered if rendered else 0.0
    out = {**{k: first[k] for k in ("max_length", "max_length_setting", "model_limit",
                                    "enable_thinking", "train_reasoning")},
           **total, "max_length_from": limit_from,
           "dropped": {k: sum(s["dropped"][k] for s in stats.values()) for k in DROP_REASONS},
           "truncated_share": round(share, 4), "truncation_warning": share > warn_truncated,
           "token_length": _length_stats(lengths),
           "splits": {name: {k: s[k] for k in _PER_SPLIT} for name, s in stats.items()}}
    assert out["rows_in"] == out["rows_out"] + sum(out["dropped"].values())
    return out


_SUMMED = ("rows_in", "rows_out", "rows_dropped", "truncated", "assistant_turns", "tokens_out",
           "label_tokens", "decode_mismatch", "label_span_mismatch", "loss_weight_masked_turns")
_PER_SPLIT = ("rows_in", "rows_out", "rows_dropped", "truncated", "truncated_share",
              "tokens_out", "label_tokens", "token_length")


def format_records(records: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int | str,
                   enable_thinking: bool, model_limit: int | None = None,
                   warn_truncated: float = 0.05, train_reasoning: bool = True,
                   ) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Render, tokenise, mask and truncate canonical records, in memory.

    Returns ``(rows, stats, dropped)``: rows carry the canonical fields (``messages``/``tools``
    as JSON strings) plus ``text``, ``input_ids``, ``labels``, ``n_tokens``,
    ``n_label_tokens`` and ``truncated``; stats count rows in/out/dropped per reason,
    truncation, token lengths (``token_length``: of the full rendering, before truncation)
    and label tokens; ``dropped`` lists every dropped row with its reason and detail. The
    stats key ``lengths`` lists the full lengths per rendered row, for plotting.

    ``max_length`` is a number or ``"auto"`` (:func:`resolve_max_length`). Truncation keeps
    the first ``max_length`` tokens. When more than ``warn_truncated`` of the rows are cut,
    a warning says so and ``truncation_warning`` is set; when more than half of the rows
    lose every assistant token, :class:`FormatError` names ``format.max_length``.
    ``train_reasoning`` off leaves think blocks unlabelled (:mod:`~reprotune.data.rendering`).
    """
    import pyarrow as pa

    render = Renderer.create(tokenizer, enable_thinking=enable_thinking,
                             train_reasoning=train_reasoning)
    parts = [pa.table(render(records[i:i + 256]), schema=rendered_schema())
             for i in tqdm(range(0, len(records), 256), desc="format", unit="batch",
                           mininterval=2)]
    table = pa.concat_tables(parts) if parts else rendered_schema().empty_table()
    p = plan(table.select(SUMMARY_FIELDS), max_length=max_length,
             enable_thinking=enable_thinking, model_limit=model_limit,
             warn_truncated=warn_truncated, train_reasoning=train_reasoning)
    rows = [r for t in cut_tables(lambda cols: iter([table.select(cols)]), p)
            for r in t.to_pylist()]
    return rows, {**p.stats, "lengths": p.lengths.tolist()}, list(dropped_rows(p))


def _task(tasks: bool) -> list[tuple[str, Any]]:
    import pyarrow as pa

    return [(TASK_FIELD, pa.string())] if tasks else []


def rendered_schema(tasks: bool = False) -> Any:
    """Arrow schema of :class:`~reprotune.data.rendering.Renderer`'s columns (``tasks``:
    with a mixture's ``task`` after the canonical fields)."""
    import pyarrow as pa

    return pa.schema([(k, pa.string()) for k in CANONICAL_FIELDS] + _task(tasks) + [
        ("text", pa.string()), ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())), ("n_full", pa.int32()), ("first_label", pa.int32()),
        ("reason", pa.string()), ("detail", pa.string()), ("decode_mismatch", pa.bool_()),
        ("span_mismatch", pa.int32()), ("turns", pa.int32()), ("masked_turns", pa.int32()),
    ])


def formatted_schema(tasks: bool = False) -> Any:
    """Arrow schema of formatted.parquet (and the split files); ``tasks``: with a mixture's
    ``task`` column after ``meta`` (without one the files are as before mixtures existed)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("messages", pa.string()),
        ("tools", pa.string()), ("label", pa.string()), ("group", pa.string()),
        ("meta", pa.string()), *_task(tasks), ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())), ("n_tokens", pa.int32()),
        ("n_label_tokens", pa.int32()), ("truncated", pa.bool_()),
    ])

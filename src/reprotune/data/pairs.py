"""Preference pairs at format: each split's pair records rendered, measured and filtered.

For every record carrying a pair (:mod:`reprotune.data.preference`) the prompt, the chosen
and the rejected answers are tokenised the way TRL's ``DPOTrainer`` tokenises a
conversational example (the chat template with ``add_generation_prompt`` for the prompt,
``enable_thinking`` as SFT rendered it, the completion starting where prompt and
prompt+answer diverge), so the lengths measured here are the lengths TRL trains on.

A pair whose prompt plus either answer is longer than ``format.max_length`` (as resolved
for SFT) is dropped with its reason, counted, never truncated: cutting one answer would
compare the model on half an answer against a whole one.

Output rows (``data/processed/pairs/<split>.jsonl``): ``id``, ``source``, ``prompt``,
``chosen``, ``rejected`` (canonical messages, text as written), ``tools``, and the token
ids ``prompt_ids``/``chosen_ids``/``rejected_ids`` the align and evaluate stages use.

Unpaired (KTO) records are rendered the same way, one answer each, as TRL's ``KTOTrainer``
tokenises them, and written to ``data/processed/pairs/unpaired_<split>.jsonl``: ``id``,
``source``, ``prompt``, ``completion``, ``label`` (true: desirable), ``tools``,
``prompt_ids``, ``completion_ids``; dropped when too long, like pairs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reprotune.data.preference import KTO_FIELD, PAIR_FIELD, sides, unpaired_sides

log = logging.getLogger(__name__)

DROP_TOO_LONG = "pair_too_long"
DROP_TEMPLATE = "pair_template_error"
DROP_REASONS = (DROP_TOO_LONG, DROP_TEMPLATE)


def _ids(tokenizer: Any, messages: list[dict], tools: Any, *, enable_thinking: bool,
         add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking)
    return list(out["input_ids"])


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict],
                  tools: Any, *, enable_thinking: bool) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` as TRL's DPOTrainer computes them."""
    kw = {"enable_thinking": enable_thinking}
    p = _ids(tokenizer, prompt, tools, add_generation_prompt=True, **kw)
    c = _ids(tokenizer, prompt + chosen, tools, **kw)
    r = _ids(tokenizer, prompt + rejected, tools, **kw)
    n = min(_common(p, c), _common(p, r))
    return {"prompt_ids": p[:n], "chosen_ids": c[n:], "rejected_ids": r[n:]}


def pair_records(path: str | Path, field: str = PAIR_FIELD) -> Iterator[dict[str, Any]]:
    """The records of a canonical JSONL file that carry a pair (``field``: or an unpaired KTO
    answer); other lines are not parsed (most SFT data has none, and a million-row split
    should not be decoded for nothing)."""
    marker = f'"{field}":'.encode()
    with Path(path).open("rb") as fh:
        for line in fh:
            if marker in line:
                rec = json.loads(line)
                if rec.get(field):
                    yield rec


def unpaired_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The unpaired (KTO) records of a canonical JSONL file."""
    return pair_records(path, KTO_FIELD)


def format_unpaired(records: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                    enable_thinking: bool) -> tuple[Iterator[dict[str, Any]], dict[str, Any],
                                                    list[dict[str, Any]]]:
    """Unpaired KTO rows of ``records``, as :func:`format_pairs` (``stats`` counts rows per
    flag: ``rows_in``, ``rows_out``, ``desirable``, ``undesirable``, ``dropped``)."""
    stats: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "desirable": 0, "undesirable": 0,
                             "dropped": dict.fromkeys(DROP_REASONS, 0), "tokens_out": 0}
    dropped: list[dict[str, Any]] = []

    def rows() -> Iterator[dict[str, Any]]:
        from jinja2.exceptions import TemplateError

        for rec in records:
            parts = unpaired_sides(rec)
            if parts is None:
                continue
            stats["rows_in"] += 1
            prompt, completion, desirable = parts
            tools = rec.get("tools") or None
            kw = {"enable_thinking": enable_thinking}
            try:
                p = _ids(tokenizer, prompt, tools, add_generation_prompt=True, **kw)
                c = _ids(tokenizer, prompt + completion, tools, **kw)
            except TemplateError as exc:
                reason, detail = DROP_TEMPLATE, f"chat template: {exc}"
            else:
                n = _common(p, c)
                if len(c) <= max_length:
                    stats["rows_out"] += 1
                    stats["desirable" if desirable else "undesirable"] += 1
                    stats["tokens_out"] += len(c)
                    yield {"id": rec["id"], "source": rec.get("source"), "prompt": prompt,
                           "completion": completion, "label": desirable, "tools": tools,
                           "prompt_ids": p[:n], "completion_ids": c[n:]}
                    continue
                reason = DROP_TOO_LONG
                detail = (f"prompt + answer = {len(c)} tokens > format.max_length "
                          f"{max_length}: dropped, not truncated")
            stats["dropped"][reason] += 1
            dropped.append({"id": rec["id"], "source": rec.get("source"), "reason": reason,
                            "detail": detail, "unpaired": True})
    return rows(), stats, dropped


def combine_unpaired(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``unpaired`` block of ``metrics/format.json``: totals per flag and per split."""
    keys = ("rows_in", "rows_out", "desirable", "undesirable", "tokens_out")
    return {**{k: sum(s[k] for s in stats.values()) for k in keys},
            "dropped": {r: sum(s["dropped"][r] for s in stats.values()) for r in DROP_REASONS},
            "splits": {name: {k: s[k] for k in ("rows_in", "desirable", "undesirable")}
                       for name, s in stats.items()}}


def format_pairs(records: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                 enable_thinking: bool) -> tuple[Iterator[dict[str, Any]], dict[str, Any],
                                                 list[dict[str, Any]]]:
    """Pair rows of ``records`` (a generator, consumed lazily) plus their counts and drops.

    ``stats`` (``pairs_in``, ``pairs_out``, ``dropped`` per reason, ``tokens_out``) is
    complete once the rows have been consumed; ``dropped`` fills as they are.
    """
    stats: dict[str, Any] = {"pairs_in": 0, "pairs_out": 0,
                             "dropped": dict.fromkeys(DROP_REASONS, 0), "tokens_out": 0}
    dropped: list[dict[str, Any]] = []

    def rows() -> Iterator[dict[str, Any]]:
        from jinja2.exceptions import TemplateError

        for rec in records:
            parts = sides(rec)
            if parts is None:
                continue
            stats["pairs_in"] += 1
            prompt, chosen, rejected = parts
            tools = rec.get("tools") or None
            try:
                ids = tokenize_pair(tokenizer, prompt, chosen, rejected, tools,
                                    enable_thinking=enable_thinking)
            except TemplateError as exc:
                reason, detail = DROP_TEMPLATE, f"chat template: {exc}"
            else:
                n_p = len(ids["prompt_ids"])
                longest = n_p + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
                if longest <= max_length:
                    stats["pairs_out"] += 1
                    stats["tokens_out"] += n_p * 2 + len(ids["chosen_ids"]) + len(ids["rejected_ids"])
                    yield {"id": rec["id"], "source": rec.get("source"), "prompt": prompt,
                           "chosen": chosen, "rejected": rejected, "tools": tools, **ids}
                    continue
                reason = DROP_TOO_LONG
                detail = (f"prompt {n_p} + answer {longest - n_p} = {longest} tokens > "
                          f"format.max_length {max_length}: dropped, not truncated")
            stats["dropped"][reason] += 1
            dropped.append({"id": rec["id"], "source": rec.get("source"), "reason": reason,
                            "detail": detail})
    return rows(), stats, dropped


def combine(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``preference`` block of ``metrics/format.json``: totals and each split's counts."""
    total = Counter()
    for s in stats.values():
        total.update({k: s[k] for k in ("pairs_in", "pairs_out", "tokens_out")})
    out = {**{k: total[k] for k in ("pairs_in", "pairs_out", "tokens_out")},
           "dropped": {r: sum(s["dropped"][r] for s in stats.values()) for r in DROP_REASONS},
           "splits": {name: {k: s[k] for k in ("pairs_in", "pairs_out")} for name, s in stats.items()}}
    assert out["pairs_in"] == out["pairs_out"] + sum(out["dropped"].values())
    return out


def emptied_splits(stats: dict[str, dict[str, Any]]) -> list[str]:
    """One warning per split that had pairs but kept none (its pairs file is then empty
    because of the length limit or the template, not because the data has no pairs)."""
    return [f"preference pairs: every one of the {name} split's {s['pairs_in']} pairs was "
            f"dropped ({', '.join(f'{k}={v}' for k, v in s['dropped'].items() if v)}), so its "
            f"pairs file is empty: raise format.max_length or shorten them"
            for name, s in stats.items() if s["pairs_in"] and not s["pairs_out"]]

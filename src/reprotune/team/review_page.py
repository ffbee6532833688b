"""Blind side-by-side human review: one self-contained offline HTML page (``make review``).

Two prediction files (``A`` and ``B``: ``base``, ``finetuned``, or a git revision's
fine-tuned predictions) are paired by row id. Each shared row shows the prompt, the
reference and the two answers, A on the left or on the right by a seeded coin per row, in a
seeded random row order. The page never says which side is which model: that mapping is
the key file (``data/review/<session>.key.json``), written beside it and committed with the
judgments. The reviewer presses ← / → / t / s (left, right, tie, skip) and saves a
judgments JSON named ``<session>.<reviewer>.judgments.json``, to be put in ``data/review/``
and committed; the ``review_wins`` stage (:mod:`reprotune.team.judgments`) turns it into
win rates.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io

log = logging.getLogger(__name__)

FORMAT = "reprotune-review/1"
REVIEW_DIR = "data/review"
PAGE = "reports/review.html"
SOURCES = {"base": "data/eval/predictions_base.jsonl", "finetuned": "data/eval/predictions.jsonl"}


class ReviewPageError(RuntimeError):
    """A user error ending `make review` with one line saying what to do."""


def session_name(a: str, b: str) -> str:
    """File-name-safe session id of an A-vs-B review."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{a}-vs-{b}")


def _coin(seed: int, row_id: str) -> bool:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[0] % 2 == 0


def blind_rows(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], seed: int
               ) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """(page rows ``{id, prompt, reference, left, right}`` in seeded order, ``{id: A is on
    the left}``) for the rows of ``a`` and ``b`` sharing an id."""
    by_id = {str(r["id"]): r for r in a}
    shared = [(by_id[str(r["id"])], r) for r in b if str(r["id"]) in by_id]
    if not shared:
        raise ReviewPageError("the two prediction files share no row id: nothing to review")
    order = sorted(shared, key=lambda p: hashlib.sha256(f"{seed}/{p[1]['id']}".encode()).hexdigest())
    rows, left_is_a = [], {}
    for ra, rb in order:
        rid = str(rb["id"])
        left_is_a[rid] = _coin(seed, rid)
        left, right = (ra, rb) if left_is_a[rid] else (rb, ra)
        rows.append({"id": rid, "prompt": rb.get("prompt") or "", "reference": rb.get("reference") or "",
                     "left": left.get("prediction") or "", "right": right.get("prediction") or ""})
    return rows, left_is_a


def render_page(rows: Sequence[dict[str, Any]], session: str) -> str:
    """The review page: data inline as JSON (every ``<`` escaped, so no text can end the
    script element), no external resource."""
    data = json.dumps({"format": FORMAT, "session": session, "rows": list(rows)},
                      ensure_ascii=False).replace("<", "\\u003c")
    return PAGE_HTML.replace("{{TITLE}}", html.escape(f"Blind review: {session}")).replace(
        "{{DATA}}", data)


def read_predictions(spec: str) -> tuple[list[dict[str, Any]], str]:
    """(records, where) of ``base`` / ``finetuned`` (workspace) or a revision's fine-tuned."""
    from reprotune.team.review import ReviewError, _jsonl, _read_at, check_rev

    if spec in SOURCES:
        path, rev = SOURCES[spec], None
    else:
        try:
            check_rev(spec)
        except ReviewError as exc:
            raise ReviewPageError(f"{exc} (or A=base / B=finetuned)") from None
        path, rev = SOURCES["finetuned"], spec
    raw = _read_at(path, rev)
    if raw is None:
        raise ReviewPageError(f"{path} is not available {'here' if rev is None else f'at {rev}'}: "
                              f"run `dvc repro evaluate` (or `make pull`) first")
    return _jsonl(raw), f"{path}@{rev or 'workspace'}"


def build(a: str, b: str, *, seed: int, page: str | Path, review_dir: str | Path
          ) -> dict[str, Any]:
    """Write the page and its key file; returns the key."""
    recs_a, where_a = read_predictions(a)
    recs_b, where_b = read_predictions(b)
    session = session_name(a, b)
    rows, left_is_a = blind_rows(recs_a, recs_b, seed)
    key = {"format": FORMAT, "session": session, "a": a, "b": b, "a_source": where_a,
           "b_source": where_b, "seed": seed, "n_rows": len(rows), "left_is_a": left_is_a}
    io.write_json(Path(review_dir) / f"{session}.key.json", key)
    with io.atomic_path(page) as tmp:
        tmp.write_text(render_page(rows, session), encoding="utf-8")
    return key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reprotune.team.review_page", description=__doc__)
    ap.add_argument("--a", default="base", help="base | finetuned | a git revision")
    ap.add_argument("--b", default="finetuned", help="base | finetuned | a git revision")
    ap.add_argument("--seed", type=int, default=0, help="row order and left/right coin")
    ap.add_argument("--out", default=PAGE, help="the HTML page to write")
    ap.add_argument("--review-dir", default=REVIEW_DIR, help="where the key file goes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        key = build(args.a, args.b, seed=args.seed, page=args.out, review_dir=args.review_dir)
    except ReviewPageError as exc:
        print(f"make review: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {key['n_rows']} rows, A={args.a} vs B={args.b} (key: "
          f"{args.review_dir}/{key['session']}.key.json). Open it in a browser, judge, save, "
          f"move the judgments file into {args.review_dir}/ and commit it with the key.")
    return 0


PAGE_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font-family: system-ui, "Noto Sans CJK SC", "Noto Sans SC", "PingFang SC",
       "Microsoft YaHei", "WenQuanYi Zen Hei", sans-serif; margin: 1.5em; color: #222; }
.text { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: .7em;
        background: #fafafa; min-height: 2em; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin-top: 1em; }
h3 { margin: .8em 0 .3em; } #progress { font-weight: bold; } .keys kbd { border: 1px solid #999;
border-radius: 3px; padding: 0 .3em; } #done { color: #060; }
</style></head><body>
<h2>{{TITLE}}</h2>
<p>Which answer is better? Keys: <span class="keys"><kbd>←</kbd> left, <kbd>→</kbd> right,
<kbd>t</kbd> tie, <kbd>s</kbd> skip, <kbd>Backspace</kbd> back.</span> The sides are shuffled per
row; the page does not know which model wrote which answer.</p>
<p>Reviewer: <input id="reviewer" placeholder="your name" autocomplete="off">
<button id="save">Save judgments</button> <span id="progress"></span> <span id="done"></span></p>
<div id="row"><h3>Prompt <small id="rowid"></small></h3><div class="text" id="prompt"></div>
<h3>Reference</h3><div class="text" id="reference"></div>
<div class="sides"><div><h3>Left</h3><div class="text" id="left"></div></div>
<div><h3>Right</h3><div class="text" id="right"></div></div></div></div>
<script type="application/json" id="data">{{DATA}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const ROWS = DATA.rows, STORE = "reprotune-review:" + DATA.session;
let state = {pos: 0, choices: {}};
try { state = Object.assign(state, JSON.parse(localStorage.getItem(STORE) || "{}")); } catch (e) {}
const $ = (id) => document.getElementById(id);
function show() {
  const n = Object.keys(state.choices).length;
  $("progress").textContent = `row ${Math.min(state.pos + 1, ROWS.length)} of ${ROWS.length}, ${n} judged`;
  $("done").textContent = n === ROWS.length ? "All rows judged: save." : "";
  const r = ROWS[Math.min(state.pos, ROWS.length - 1)];
  for (const k of ["prompt", "reference", "left", "right"]) $(k).textContent = r[k];
  $("rowid").textContent = "(" + r.id + ")";
  try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) {}
}
function judge(choice) {
  if (state.pos >= ROWS.length) return;
  state.choices[ROWS[state.pos].id] = choice;
  state.pos = Math.min(state.pos + 1, ROWS.length);
  show();
}
document.addEventListener("keydown", (ev) => {
  if (ev.target === $("reviewer")) return;
  const choice = {ArrowLeft: "left", ArrowRight: "right", t: "tie", s: "skip"}[ev.key];
  if (choice) { judge(choice); ev.preventDefault(); }
  else if (ev.key === "Backspace") { state.pos = Math.max(0, state.pos - 1); show(); ev.preventDefault(); }
});
$("save").addEventListener("click", () => {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { $("reviewer").focus(); $("done").textContent = "Enter your name first."; return; }
  const out = {format: DATA.format, session: DATA.session, reviewer: reviewer,
               judgments: ROWS.filter((r) => r.id in state.choices)
                              .map((r) => ({id: r.id, choice: state.choices[r.id]}))};
  const blob = new Blob([JSON.stringify(out, null, 1) + "\\n"], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${DATA.session}.${reviewer.replace(/[^\\p{L}\\p{N}._-]+/gu, "_")}.judgments.json`;
  document.body.appendChild(a); a.click(); a.remove();
});
show();
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())

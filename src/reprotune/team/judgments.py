"""Committed human judgments -> win rates with intervals (the ``review_wins`` stage).

``data/review/`` holds, per review session, the key written with the page
(``<session>.key.json``: which side showed A on each row) and one judgments file per
reviewer (``<session>.<reviewer>.judgments.json``, saved by the page). Each judged row is
a win for A or B, a tie (half a win each) or a skip (not counted). The win rate of B is
``(B wins + ties / 2) / judged rows``, with a seeded 95% bootstrap interval over the
judgments, per reviewer and over all reviewers of the session pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io
from reprotune.evaluate import significance as S

log = logging.getLogger(__name__)

FORMAT = "reprotune-review/1"
CHOICES = ("left", "right", "tie", "skip")
KEY_SUFFIX, JUDGMENTS_SUFFIX = ".key.json", ".judgments.json"
B_PREFERRED, A_PREFERRED, NO_PREFERENCE = "b preferred", "a preferred", "no detectable preference"


class JudgmentError(ValueError):
    """A judgments or key file that cannot be used; the message names the file and the fix."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = io.read_json(path)
    except (OSError, ValueError) as exc:
        raise JudgmentError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JudgmentError(f"{path}: field 'format' must be {FORMAT!r} (save it from the page "
                            f"`make review` writes)")
    return data


def read_key(path: str | Path) -> dict[str, Any]:
    """A session key file (``session``, ``a``, ``b``, ``left_is_a``)."""
    key = _read(Path(path))
    if not isinstance(key.get("left_is_a"), dict) or not key.get("session"):
        raise JudgmentError(f"{path}: fields 'session' and 'left_is_a' are required "
                            f"(rewrite it with `make review`)")
    return key


def read_judgments(path: str | Path, keys: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One reviewer's judgments, checked against its session's key: every id must be a row
    of that session's predictions, every choice one of :data:`CHOICES`, no id twice."""
    path = Path(path)
    data = _read(path)
    session, reviewer = data.get("session"), data.get("reviewer")
    if session not in keys:
        raise JudgmentError(f"{path}: session {session!r} has no key file "
                            f"{session}{KEY_SUFFIX} in {path.parent}: commit the key `make review` "
                            f"wrote with the page")
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise JudgmentError(f"{path}: field 'reviewer' must be a non-empty name")
    items = data.get("judgments")
    if not isinstance(items, list):
        raise JudgmentError(f"{path}: field 'judgments' must be a list of {{id, choice}}")
    known = keys[session]["left_is_a"]
    unknown = [str(j.get("id")) for j in items if isinstance(j, dict) and str(j.get("id")) not in known]
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise JudgmentError(f"{path}: ids {unknown[:10]}{more} are not in the predictions of "
                            f"session {session!r} ({keys[session].get('a_source')} vs "
                            f"{keys[session].get('b_source')}): refused")
    seen: set[str] = set()
    for i, j in enumerate(items):
        if not isinstance(j, dict) or j.get("choice") not in CHOICES:
            raise JudgmentError(f"{path}: judgments[{i}]: field 'choice' must be one of "
                                f"{', '.join(CHOICES)}")
        if str(j["id"]) in seen:
            raise JudgmentError(f"{path}: judgments[{i}]: id {j['id']!r} judged twice")
        seen.add(str(j["id"]))
    return data


def outcomes(judgments: Sequence[dict[str, Any]], left_is_a: dict[str, bool]) -> list[float]:
    """B's score per judged row (1 B won, 0 A won, 0.5 tie); skips are left out."""
    out = []
    for j in judgments:
        if j["choice"] == "skip":
            continue
        if j["choice"] == "tie":
            out.append(0.5)
            continue
        a_left = left_is_a[str(j["id"])]
        out.append(0.0 if (j["choice"] == "left") == a_left else 1.0)
    return out


def win_rate(scores: Sequence[float], n_skipped: int = 0, *, resamples: int = S.N_RESAMPLES,
             seed: int = S.SEED, min_rows: int = S.MIN_ROWS) -> dict[str, Any]:
    """``{n, b_wins, a_wins, ties, skipped, win_rate_b, low, high, verdict}``."""
    x = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"n": int(x.size), "b_wins": int((x == 1).sum()),
                           "a_wins": int((x == 0).sum()), "ties": int((x == 0.5).sum()),
                           "skipped": n_skipped}
    if x.size == 0:
        return {**out, "win_rate_b": None, "low": None, "high": None, "verdict": S.TOO_FEW}
    low, high = S.percentile_interval(x[S.resample_indices(x.size, resamples, seed)].mean(1))
    if x.size < min_rows:
        verdict = S.TOO_FEW
    else:
        verdict = B_PREFERRED if low > 0.5 else A_PREFERRED if high < 0.5 else NO_PREFERENCE
    return {**out, "win_rate_b": round(float(x.mean()), 6), "low": round(low, 6),
            "high": round(high, 6), "verdict": verdict}


def review_metrics(review_dir: str | Path) -> dict[str, Any]:
    """Win rates of every session in ``review_dir``, per reviewer and overall."""
    review_dir = Path(review_dir)
    keys = {}
    for p in sorted(review_dir.glob(f"*{KEY_SUFFIX}")):
        key = read_key(p)
        keys[key["session"]] = key
    per: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in keys}
    for p in sorted(review_dir.glob(f"*{JUDGMENTS_SUFFIX}")):
        data = read_judgments(p, keys)
        reviewer = data["reviewer"].strip()
        if reviewer in per[data["session"]]:
            raise JudgmentError(f"{p}: reviewer {reviewer!r} has a second judgments file for "
                                f"session {data['session']!r}: keep one")
        per[data["session"]][reviewer] = data["judgments"]
    sessions: dict[str, Any] = {}
    for name, key in keys.items():
        reviewers, pooled, skipped = {}, [], 0
        for reviewer, items in sorted(per[name].items()):
            scores = outcomes(items, key["left_is_a"])
            n_skip = sum(j["choice"] == "skip" for j in items)
            reviewers[reviewer] = win_rate(scores, n_skip)
            pooled += scores
            skipped += n_skip
        sessions[name] = {"a": key["a"], "b": key["b"], "n_rows": key.get("n_rows"),
                          "overall": win_rate(pooled, skipped), "reviewers": reviewers}
    return {"sessions": sessions, "n_sessions": len(sessions),
            "n_judgments": sum(s["overall"]["n"] + s["overall"]["skipped"]
                               for s in sessions.values())}

"""Row times for the time-ordered split (``split.order_by``).

The time of a row is a field the user's raw rows carry (e.g. ``created_at``), kept by ingest
in the record's ``meta`` (``ingest.keep_fields``). Accepted values, all turned into seconds
since the Unix epoch (UTC) so that they compare with each other:

* ISO 8601 dates and datetimes: ``2024-03-01``, ``2024-03-01T12:30:00``, ``...Z``,
  ``...+08:00``, fractional seconds; a datetime without a zone is taken as UTC;
* numbers, or text holding one: seconds since the epoch (``1709296200``, ``1709296200.5``).

Anything else (``"March 1st"``, ``"01/03/2024"``, booleans, NaN, objects) is unparsable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

ACCEPTED = "an ISO 8601 date/datetime (2024-03-01, 2024-03-01T12:30:00Z) or epoch seconds"


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch (UTC) of an accepted value (module docstring), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) else None
    if text[-1] in "Zz":  # Python 3.10's fromisoformat does not read the Z suffix
        text = text[:-1] + "+00:00"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def iso(seconds: float) -> str:
    """An epoch time as an ISO 8601 UTC datetime (for metrics)."""
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


def meta_value(row: dict[str, Any], fld: str) -> Any:
    """The kept raw field ``fld`` of a row (``meta`` may be a JSON string, as in Parquet)."""
    meta = row.get("meta")
    if isinstance(meta, str):
        meta = json.loads(meta)
    return meta.get(fld) if isinstance(meta, dict) else None


@dataclass
class RowTimes:
    """Parsed times (None where missing or unparsable) and the rows at fault."""

    times: list[float | None]
    missing: list[int]
    unparsable: list[int]


def row_times(rows: Sequence[dict[str, Any]], fld: str) -> RowTimes:
    """The time of every row from its kept field ``fld``."""
    times: list[float | None] = []
    missing, unparsable = [], []
    for i, row in enumerate(rows):
        value = meta_value(row, fld)
        t = None if value in (None, "") else parse_time(value)
        if value in (None, ""):
            missing.append(i)
        elif t is None:
            unparsable.append(i)
        times.append(t)
    return RowTimes(times, missing, unparsable)

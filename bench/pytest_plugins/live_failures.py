"""A pytest plugin for bench/gpu_check.sh: print each failure's short traceback the moment the
test fails, not at the end of the session (a step killed by its cap never reaches the end).

    PYTHONPATH=bench/pytest_plugins python -m pytest -p live_failures ...
"""

from __future__ import annotations

import sys
from typing import Any

MAX_CHARS = 4000  # of each failure's traceback (--tb sets its style)


def pytest_runtest_logreport(report: Any) -> None:
    if report.failed:
        text = report.longreprtext
        if len(text) > MAX_CHARS:
            text = "...\n" + text[-MAX_CHARS:]
        sys.stdout.write(f"\n!!! FAILED {report.nodeid} ({report.when}, {report.duration:.1f}s)\n"
                         f"{text}\n!!! end of {report.nodeid}\n")
        sys.stdout.flush()

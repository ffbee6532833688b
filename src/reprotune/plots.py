"""Matplotlib figures for metrics/plots/, rendered headless (Agg) and written atomically."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from reprotune import io

log = logging.getLogger(__name__)


def histogram(values: Sequence[float], path: str | Path, *, title: str, xlabel: str,
              vline: float | None = None, bins: int = 40) -> None:
    """Write a histogram of ``values`` as PNG to ``path``; ``vline`` marks a threshold."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines; must precede pyplot's first import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        if len(values):
            ax.hist(values, bins=bins, color="#4C72B0", edgecolor="white")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if vline is not None:
            ax.axvline(vline, color="#C44E52", linestyle="--", label=f"{vline:g}")
            ax.legend(loc="upper right")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        fig.tight_layout()
        with io.atomic_path(path) as tmp:
            # metadata={"Software": None}: no version string, so identical input, identical bytes
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    log.info("wrote %s", path)

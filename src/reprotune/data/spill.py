"""Corpus data spilled to disk so the near-duplicate search runs in bounded memory.

- :class:`DiskTexts`: an append-only sequence of texts kept in a UTF-8 temporary file; memory
  holds 12 bytes per text (its end offset and its length in characters).
- :class:`Partitions`: (feature hash, ...) entries routed by the top bits of the hash into
  ``count`` partitions, so each partition can be sorted and counted on its own. One partition
  stays in memory; more are appended to files in a temporary folder, one per partition.
- :func:`ordered_map`: a process pool whose jobs and results in flight stay bounded.

Both live in a :class:`tempfile.TemporaryDirectory` (``$TMPDIR``) removed with the object.
"""

from __future__ import annotations

import logging
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from reprotune import io

logger = logging.getLogger(__name__)

FEAT_BITS = 52  # the feature hashes of reprotune.data.ngrams


class DiskTexts(Sequence[str]):
    """Texts appended one by one and read back by index or slice (one file read per slice)."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        io.remove_dead_scratch("texts")  # what a killed dedup/split left behind
        self._dir = tempfile.TemporaryDirectory(prefix=io.scratch_prefix("texts"))
        self._fh = (Path(self._dir.name) / "texts.utf8").open("w+b")
        self._ends = array("q")  # grown while appending, then frozen into numpy arrays
        self._chars = array("i")
        self._pos = 0
        self._frozen: tuple[np.ndarray, np.ndarray] | None = None
        for t in texts:
            self.append(t)

    def append(self, text: str) -> None:
        """Add one text at the end (only before the first read)."""
        if self._frozen is not None:
            raise RuntimeError("DiskTexts: append after reading")
        data = text.encode("utf-8")
        self._fh.write(data)
        self._pos += len(data)
        self._ends.append(self._pos)
        self._chars.append(len(text))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._frozen is None:
            self._fh.flush()
            ends = np.zeros(len(self._ends) + 1, dtype=np.int64)
            ends[1:] = np.frombuffer(self._ends, dtype=np.int64)
            self._frozen = (ends, np.frombuffer(self._chars, dtype=np.int32).copy())
            self._ends, self._chars = array("q"), array("i")
        return self._frozen

    @property
    def lengths(self) -> np.ndarray:
        """Length in characters of every text."""
        return self._arrays()[1]

    def __len__(self) -> int:
        return len(self._ends) if self._frozen is None else self._frozen[1].size

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        ends, _ = self._arrays()
        n = ends.size - 1
        if isinstance(i, slice):
            a, b, step = i.indices(n)
            if step != 1:
                return [self[k] for k in range(a, b, step)]
            if a >= b:
                return []
            self._fh.seek(int(ends[a]))
            buf = self._fh.read(int(ends[b] - ends[a]))
            off = ends[a:b + 1] - ends[a]
            return [buf[off[k]:off[k + 1]].decode("utf-8") for k in range(b - a)]
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        self._fh.seek(int(ends[i]))
        return self._fh.read(int(ends[i + 1] - ends[i])).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for a in range(0, len(self), 4096):
            yield from self[a:a + 4096]


class Partitions:
    """Record arrays (field ``f``: a feature hash) split by the top ``bits`` of ``f``."""

    def __init__(self, bits: int, dtype: Any, folder: str | Path | None = None) -> None:
        self.bits, self.dtype, self.count = bits, np.dtype(dtype), 1 << bits
        self._mem: list[list[np.ndarray]] = [[] for _ in range(self.count)]
        self._dir = None
        self._files: list[Any] = []
        if self.count > 1:
            io.remove_dead_scratch("parts", folder)
            self._dir = tempfile.TemporaryDirectory(prefix=io.scratch_prefix("parts"), dir=folder)
            self._files = [(Path(self._dir.name) / f"part{p:04d}.bin").open("w+b")
                           for p in range(self.count)]

    def part_of(self, feats: np.ndarray) -> np.ndarray:
        """Partition of each feature hash."""
        return (feats >> np.uint64(FEAT_BITS - self.bits)).astype(np.int64)

    def add(self, entries: np.ndarray) -> None:
        """Route ``entries`` (of ``dtype``) to their partitions, keeping their order in each."""
        if self.count == 1:
            self._mem[0].append(entries.copy())
            return
        part = self.part_of(entries["f"])
        routed = entries[np.argsort(part.astype(np.uint16), kind="stable")]
        ends = np.cumsum(np.bincount(part, minlength=self.count))
        start = 0
        for p, end in enumerate(ends.tolist()):
            if end > start:
                routed[start:end].tofile(self._files[p])
            start = end

    def load(self, p: int) -> np.ndarray:
        """All entries of partition ``p``, in the order they were added."""
        if self.count == 1:
            parts = self._mem[0]
            return np.concatenate(parts) if parts else np.empty(0, self.dtype)
        fh = self._files[p]
        fh.flush()
        fh.seek(0)
        return np.fromfile(fh, dtype=self.dtype)

    def replace(self, p: int, data: dict[str, np.ndarray]) -> None:
        """Swap partition ``p``'s raw entries for derived arrays (kept in memory or on disk)."""
        if self.count == 1:
            self._mem[0] = []
            self._derived = data
            return
        self._files[p].close()
        Path(self._files[p].name).unlink()
        np.savez(Path(self._dir.name) / f"part{p:04d}.npz", **data)

    def derived(self, p: int) -> dict[str, np.ndarray]:
        """The arrays stored by :meth:`replace` for partition ``p``."""
        if self.count == 1:
            return self._derived
        with np.load(Path(self._dir.name) / f"part{p:04d}.npz") as z:
            return {k: z[k] for k in z.files}

    def close(self) -> None:
        """Remove the files (also done when the object is garbage-collected)."""
        for fh in self._files:
            if not fh.closed:
                fh.close()
        if self._dir is not None:
            self._dir.cleanup()


def ordered_map(fn: Callable[..., Any], jobs: Iterable[tuple[Any, ...]], workers: int
                ) -> Iterator[Any]:
    """``fn(*job)`` for each job, results in job order; ``workers`` > 1 runs them in that many
    spawned processes with at most ``2 * workers`` jobs in flight, so neither the jobs nor
    the results pile up in memory (``Pool.imap`` would read ahead without bound). The
    results do not depend on ``workers``."""
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        pending: deque[Any] = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

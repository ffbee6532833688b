"""Padding-free packing: samples share one row, attention and labels stay per sample.

Two styles (:func:`resolve_packing`):

* ``packs`` (``train.packing: true``; ``auto`` on CUDA): :func:`pack_rows` groups the
  (seeded, shuffled) train rows into packs of at most ``train.tokens_per_batch`` tokens, one
  pack per micro-step;
* ``padding_free`` (``train.packing: padding_free``; ``auto`` on CPU): the Trainer samples
  ``batch_size`` rows per micro-step exactly as for padded batches (:class:`PaddingFreeRows`
  makes each row a pack of one), and the collator joins them without padding. Same rows,
  same steps and schedule: the loss equals the padded batch's up to the order in which
  floats are summed, and no compute is spent on padding (on CPU, where nothing else hides
  it, that is most of what packing saves).

Either way :class:`PackingCollator` turns a micro-step's samples into a single row with no
padding at all:

* ``position_ids`` restart at 0 for every sample, so rotary embeddings see each sample as
  if it were alone;
* the label of each sample's first token is ``IGNORE_INDEX``: after the causal shift it would
  be predicted from the last token of the *previous* sample. A sample's first token is never
  a target when the sample runs alone either, so losses and label counts are unchanged;
* ``cu_seq_lens_q``/``cu_seq_lens_k`` (cumulative sample boundaries, FlashAttention's
  varlen convention) travel with the batch through the model's ``**kwargs`` down to the
  attention function. Position ids alone do not isolate samples in transformers' ``sdpa``,
  ``eager`` or ``flex_attention`` during training, so the boundaries are enforced by
  :mod:`reprotune.train.packed_attention`.

Packs are built once per run, so their number (and the Trainer's epoch length, schedule and
resume bookkeeping) is fixed; the Trainer shuffles their order every epoch. They hold row
indices only (:class:`PackedRows`): a pack's samples are read from the split when the data
loader asks for it, as numpy views of the memory-mapped rows (:mod:`reprotune.train.data`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reprotune.constants import IGNORE_INDEX
from reprotune.train.data import progress
from reprotune.train.methods import TrainSetupError

log = logging.getLogger(__name__)

# Soft prompts add per-sample virtual tokens (prompt tuning) or per-sample KV prefixes
# (prefix tuning) in peft's own forward, which knows nothing of sample boundaries.
UNPACKABLE_METHODS = ("prompt_tuning", "prefix_tuning")


OFF, PADDING_FREE, PACKS = "off", "padding_free", "packs"  # the styles a run can take


def resolve_packing(setting: bool | str, device: str, method: str) -> tuple[str, str]:
    """How this run batches its train rows (:data:`OFF`, :data:`PADDING_FREE` or
    :data:`PACKS`), and why. ``train.packing``: ``auto`` = packs on CUDA, padding-free on
    CPU; ``true`` = packs; ``padding_free``; ``false`` = padded batches."""
    if setting == "auto":
        style = PACKS if device.startswith("cuda") else PADDING_FREE
    else:
        style = PADDING_FREE if setting == PADDING_FREE else PACKS if setting else OFF
    why = f"train.packing: {setting}" + (f" on {device}" if setting == "auto" else "")
    if style != OFF and method in UNPACKABLE_METHODS:
        note = (f"{why}, but method={method} adds per-sample virtual tokens inside peft's "
                f"forward, which cannot see sample boundaries; training unpacked (padded)")
        log.warning(note)
        return OFF, note
    if style == PADDING_FREE:
        why += ": padding-free batches (the same batch_size rows as padded batches, joined)"
    return style, why


def row_lengths(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """Tokens per row: an :class:`~reprotune.train.data.ArrowSplit`'s own lengths, or counted."""
    lengths = getattr(rows, "lengths", None)
    if lengths is not None:
        return lengths
    return np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))


def check_budget(lengths: np.ndarray, budget: int, path: str) -> None:
    """Every sample must fit in one pack: a longer one is an error, never truncated."""
    over = np.flatnonzero(lengths > budget)
    if len(over):
        i, n = int(over[0]), int(lengths[over[0]])
        raise TrainSetupError(
            f"{path}: row {i + 1} has {n} tokens, more than train.tokens_per_batch {budget} "
            f"(the packing budget); raise train.tokens_per_batch to at least {n} or lower "
            f"format.max_length (samples are never truncated to fit a pack)")


def pack_rows(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    """Row indices per pack: a seeded shuffle, then next-fit into ``budget`` tokens.

    Next-fit keeps the shuffled order (a pack is a run of consecutive shuffled rows) and is
    linear in the number of rows; the space it leaves at the end of a pack is not padding,
    just a shorter row.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    with progress(len(order), "packing", items=order) as bar:
        for i in bar:
            if lengths[i] > budget:
                raise TrainSetupError(f"row {i + 1}: {lengths[i]} tokens exceed "
                                      f"train.tokens_per_batch {budget}")
            if current and used + lengths[i] > budget:
                packs.append(current)
                current, used = [], 0
            current.append(i)
            used += lengths[i]
    if current:
        packs.append(current)
    return packs


def balance_packs(packs: list[list[int]], processes: int) -> list[list[int]]:
    """Split packs until their number divides by ``processes``: every process then gets
    the same number of packs each epoch, so the data loader never repeats a pack to even
    them out, and no sample is dropped or seen twice.

    The pack with the most samples is halved (at a sample boundary) each time; at most
    ``processes - 1`` splits.
    """
    packs = [list(p) for p in packs]
    while len(packs) % processes:
        i = max(range(len(packs)), key=lambda j: len(packs[j]))  # first of the largest
        if len(packs[i]) < 2:
            raise TrainSetupError(
                f"train.num_processes: {len(packs)} packs of one sample each cannot be shared "
                f"evenly by {processes} processes without repeating a sample; use a "
                f"train.num_processes that divides {len(packs)}")
        half = len(packs[i]) // 2
        packs[i:i + 1] = [packs[i][:half], packs[i][half:]]
    return packs


class PackedRows:
    """The train split as packs, one dataset item per pack: ``packs[k]`` is
    ``{"samples": [row, ...]}``, its rows read from ``rows`` when asked for. The packs are
    kept as two numpy arrays (row indices in pack order, and where each pack starts)."""

    def __init__(self, rows: Sequence[dict[str, Any]], packs: list[list[int]],
                 lengths: np.ndarray) -> None:
        self.rows = rows
        self.order = np.fromiter((i for p in packs for i in p), dtype=np.int64,
                                 count=sum(len(p) for p in packs))
        self.starts = np.cumsum([0, *(len(p) for p in packs)])
        self.pack_tokens = (np.add.reduceat(lengths[self.order], self.starts[:-1])
                            if packs else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self):
            raise IndexError(f"pack {k} of {len(self)}")
        return {"samples": [self.rows[i] for i in self.order[self.starts[k]:self.starts[k + 1]]]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[k] for k in range(len(self)))


class PaddingFreeRows:
    """The train split with every row a pack of one (``{"samples": [row]}``): the Trainer
    samples and batches it as it does the plain rows (same length, so the same seeded order),
    and :class:`PackingCollator` joins a batch's rows without padding."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"samples": [self.rows[k]]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[k] for k in range(len(self)))


def packed_dataset(rows: Sequence[dict[str, Any]], budget: int, seed: int, *,
                   grad_accum: int = 1, path: str = "train split",
                   num_processes: int = 1) -> PackedRows:
    """The train split as packs (:class:`PackedRows`).

    Fails (naming the params) on a sample longer than the budget and when one optimizer
    step (``grad_accum`` packs on each of ``num_processes`` processes) needs more packs than
    the split fills. Several processes: the pack count is made a multiple of theirs
    (:func:`balance_packs`).
    """
    lengths = row_lengths(rows)
    check_budget(lengths, budget, path)
    packs = pack_rows(lengths.tolist(), budget, seed)
    if len(packs) < grad_accum * num_processes:
        procs = f" on each of train.num_processes {num_processes}" if num_processes > 1 else ""
        raise TrainSetupError(
            f"train.grad_accum: {grad_accum} packs per optimizer step{procs}, but the train "
            f"split fills only {len(packs)} pack(s) of train.tokens_per_batch {budget} tokens; "
            f"lower train.grad_accum or train.tokens_per_batch")
    if num_processes > 1:
        packs = balance_packs(packs, num_processes)
    items = PackedRows(rows, packs, lengths)
    tokens = int(lengths.sum())
    log.info("packing: %d rows (%d tokens) into %d packs of <= %d tokens (%.1f%% of the "
             "budget used on average)", len(rows), tokens, len(items), budget,
             100 * tokens / (len(items) * budget) if len(items) else 0.0)
    return items


def pack_stats(items: PackedRows, budget: int) -> dict[str, Any]:
    """Sizes of the packs, for the train metrics."""
    sizes, n = items.pack_tokens, len(items)
    total = int(sizes.sum())
    return {"packs": n, "tokens_per_batch": budget,
            "mean_pack_tokens": round(total / n, 1) if n else 0.0,
            "budget_fill": round(total / (n * budget), 4) if n else 0.0}


@dataclass
class PackingCollator:
    """One pack (a batch of one dataset item) -> a single padding-free row with boundaries.

    Batches of plain rows (the evaluation set) go to ``unpacked`` (the padding collator).

    ``pad_to`` (``train.tokens_per_batch`` under ``train.torch_compile``): static shapes, so a
    compiled model does not recompile per pack. Every row is padded to ``pad_to`` tokens by
    one extra segment of ``pad_id`` (its own sample: no real token attends to it; labels
    ``IGNORE_INDEX``, attention mask 0, so no count changes), ``max_length`` is ``pad_to``,
    and the boundaries are padded with empty segments to a power-of-two length (a handful
    of shapes in a whole run).
    """

    unpacked: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    pad_to: int | None = None
    pad_id: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "samples" not in features[0]:
            if self.unpacked is None:
                raise ValueError("PackingCollator: got plain rows and has no unpacked collator")
            return self.unpacked(features)
        samples = [s for f in features for s in f["samples"]]
        sizes = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.concatenate([np.asarray(s["input_ids"], dtype=np.int64) for s in samples])
        labels = np.concatenate([np.asarray(s["labels"], dtype=np.int64) for s in samples])
        # the first token's label would be predicted across the boundary: never a target
        labels[bounds[:-1]] = IGNORE_INDEX
        positions = np.arange(len(ids), dtype=np.int64) - np.repeat(bounds[:-1], sizes)
        mask = np.ones(len(ids), dtype=np.int64)
        longest = int(sizes.max())
        if self.pad_to is not None:
            ids, labels, positions, mask, bounds = _pad_static(
                ids, labels, positions, mask, bounds, self.pad_to, self.pad_id)
            longest = self.pad_to
        cu = torch.from_numpy(bounds.astype(np.int32))
        return {"input_ids": torch.from_numpy(ids)[None],
                "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(positions)[None],
                # only read by the Trainer's non-padding token count, dropped before the
                # forward (a 2D mask would make transformers build a dense T x T mask)
                "attention_mask": torch.from_numpy(mask)[None],
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


def _pad_static(ids: np.ndarray, labels: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                bounds: np.ndarray, pad_to: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """One pack padded to ``pad_to`` tokens (a segment of its own) and a power-of-two
    number of boundaries (empty segments at the end); see :class:`PackingCollator`."""
    extra = pad_to - len(ids)
    if extra < 0:
        raise ValueError(f"a pack of {len(ids)} tokens exceeds train.tokens_per_batch {pad_to}")
    if extra:
        ids = np.concatenate([ids, np.full(extra, pad_id, dtype=ids.dtype)])
        labels = np.concatenate([labels, np.full(extra, IGNORE_INDEX, dtype=labels.dtype)])
        positions = np.concatenate([positions, np.arange(extra, dtype=positions.dtype)])
        mask = np.concatenate([mask, np.zeros(extra, dtype=mask.dtype)])
        bounds = np.append(bounds, pad_to)
    width = 1 << (len(bounds) - 1).bit_length()  # next power of two >= len(bounds)
    bounds = np.concatenate([bounds, np.full(width - len(bounds), pad_to, dtype=bounds.dtype)])
    return ids, labels, positions, mask, bounds


def is_packed(inputs: dict[str, Any]) -> bool:
    """Whether a batch came from :class:`PackingCollator`."""
    return "cu_seq_lens_q" in inputs


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch as the model takes it: a packed batch loses its all-ones attention mask."""
    if is_packed(inputs):
        return {k: v for k, v in inputs.items() if k != "attention_mask"}
    return dict(inputs)

"""Padding-free packing: samples share one row, attention and labels stay per sample.

With ``train.packing`` on, :func:`pack_rows` groups the (seeded, shuffled) train rows into
packs of at most ``train.tokens_per_batch`` tokens, and :class:`PackingCollator` turns one
pack into a single row with no padding at all:

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
resume bookkeeping) is fixed; the Trainer shuffles their order every epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reprotune.train.methods import TrainSetupError
from reprotune.train.training import IGNORE_INDEX

log = logging.getLogger(__name__)

# Soft prompts add per-sample virtual tokens (prompt tuning) or per-sample KV prefixes
# (prefix tuning) in peft's own forward, which knows nothing of sample boundaries.
UNPACKABLE_METHODS = ("prompt_tuning", "prefix_tuning")


def resolve_packing(setting: bool | str, device: str, method: str) -> tuple[bool, str]:
    """Whether this run packs, and why (``train.packing``: auto = on for CUDA, off on CPU)."""
    wanted = device.startswith("cuda") if setting == "auto" else bool(setting)
    why = f"train.packing: {setting}" + (f" on {device}" if setting == "auto" else "")
    if wanted and method in UNPACKABLE_METHODS:
        note = (f"{why}, but method={method} adds per-sample virtual tokens inside peft's "
                f"forward, which cannot see sample boundaries; training unpacked (padded)")
        log.warning(note)
        return False, note
    return wanted, why


def check_budget(rows: list[dict[str, Any]], budget: int, path: str) -> None:
    """Every sample must fit in one pack: a longer one is an error, never truncated."""
    for i, row in enumerate(rows, 1):
        n = len(row["input_ids"])
        if n > budget:
            raise TrainSetupError(
                f"{path}: row {i} has {n} tokens, more than train.tokens_per_batch {budget} "
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
    for i in order:
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


def packed_dataset(rows: list[dict[str, list[int]]], budget: int, seed: int, *,
                   grad_accum: int = 1, path: str = "train split",
                   num_processes: int = 1) -> list[dict[str, Any]]:
    """The train split as packs: one dataset item per pack, holding its samples.

    Fails (naming the params) on a sample longer than the budget and when one optimizer
    step (``grad_accum`` packs on each of ``num_processes`` processes) needs more packs than
    the split fills. Several processes: the pack count is made a multiple of theirs
    (:func:`balance_packs`).
    """
    check_budget(rows, budget, path)
    packs = pack_rows([len(r["input_ids"]) for r in rows], budget, seed)
    if len(packs) < grad_accum * num_processes:
        procs = f" on each of train.num_processes {num_processes}" if num_processes > 1 else ""
        raise TrainSetupError(
            f"train.grad_accum: {grad_accum} packs per optimizer step{procs}, but the train "
            f"split fills only {len(packs)} pack(s) of train.tokens_per_batch {budget} tokens; "
            f"lower train.grad_accum or train.tokens_per_batch")
    if num_processes > 1:
        packs = balance_packs(packs, num_processes)
    items = [{"samples": [rows[i] for i in pack]} for pack in packs]
    tokens = sum(len(r["input_ids"]) for r in rows)
    log.info("packing: %d rows (%d tokens) into %d packs of <= %d tokens (%.1f%% of the "
             "budget used on average)", len(rows), tokens, len(items), budget,
             100 * tokens / (len(items) * budget) if items else 0.0)
    return items


def pack_stats(items: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Sizes of the packs, for the train metrics."""
    sizes = [sum(len(s["input_ids"]) for s in it["samples"]) for it in items]
    return {"packs": len(items), "tokens_per_batch": budget,
            "mean_pack_tokens": round(sum(sizes) / len(sizes), 1) if sizes else 0.0,
            "budget_fill": round(sum(sizes) / (len(sizes) * budget), 4) if sizes else 0.0}


@dataclass
class PackingCollator:
    """One pack (a batch of one dataset item) -> a single padding-free row with boundaries.

    Batches of plain rows (the evaluation set) go to ``unpacked`` (the padding collator).
    """

    unpacked: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "samples" not in features[0]:
            if self.unpacked is None:
                raise ValueError("PackingCollator: got plain rows and has no unpacked collator")
            return self.unpacked(features)
        samples = [s for f in features for s in f["samples"]]
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for s in samples:
            n = len(s["input_ids"])
            ids.extend(s["input_ids"])
            # the first token's label would be predicted across the boundary: never a target
            labels.extend([IGNORE_INDEX, *s["labels"][1:]])
            positions.extend(range(n))
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                # all ones: only read by the Trainer's non-padding token count, dropped before
                # the forward (a 2D mask would make transformers build a dense T x T mask)
                "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


def is_packed(inputs: dict[str, Any]) -> bool:
    """Whether a batch came from :class:`PackingCollator`."""
    return "cu_seq_lens_q" in inputs


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch as the model takes it: a packed batch loses its all-ones attention mask."""
    if is_packed(inputs):
        return {k: v for k, v in inputs.items() if k != "attention_mask"}
    return dict(inputs)

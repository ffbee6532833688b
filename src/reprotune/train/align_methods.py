"""The TRL trainer behind each ``align.method``: DPO, ORPO, SimPO (TRL's CPO) and KTO.

=======  ==============================================  ==================================
method   TRL trainer                                     reference model
=======  ==============================================  ==================================
dpo      ``trl.DPOTrainer``                              SFT model (adapter ``ref`` copy,
                                                         precomputed log-probs or a copy)
kto      ``trl.KTOTrainer`` (each pair unpaired into a   as dpo
         desirable and an undesirable answer, plus
         format's unpaired rows)
orpo     ``trl.experimental.orpo.ORPOTrainer``           none (reference-free)
simpo    ``trl.experimental.cpo.CPOTrainer``,            none (reference-free)
         ``loss_type="simpo"``
=======  ==============================================  ==================================

Every trainer trains on the token ids format measured (``data/processed/pairs``):

* DPO and KTO render the conversational pairs themselves with the SFT tokenizer, chat
  template and ``enable_thinking``; their ids are checked against format's.
* ORPO and CPO render the chat template to text, tokenise that text and append an EOS
  after the template's closing newline, with no per-row tools: they would train on a
  sequence format never measured. They are handed format's ids instead (their
  ``tokenize_row`` reads them), and what is checked is the sequences they collate:
  prompt + answer ids, the prompt masked out of the labels.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

from reprotune.constants import IGNORE_INDEX
from reprotune.params import AlignParams
from reprotune.train.methods import TrainSetupError

log = logging.getLogger(__name__)

REFERENCE_FREE = ("orpo", "simpo")
# a method's (trainer class, its config, split -> TRL dataset, split -> the
# (row id, {column: ids}) TRL's prepared dataset must hold, in its order)
Builder = tuple[type, Any, Callable[[str], Any],
                Callable[[str], list[tuple[str, dict[str, list[int]]]]]]


def losses(cfg: AlignParams) -> list[str]:
    """The loss terms of ``cfg.method``, as the metrics name them (``sft``: the NLL of chosen)."""
    main = cfg.loss_type if cfg.method == "dpo" else cfg.method
    return [main] + (["sft"] if cfg.method in ("dpo", "simpo") and cfg.sft_weight > 0 else [])


def precomputes_ref(cfg: AlignParams, kind: str) -> bool:
    """Whether the reference log-probs are computed once before training (full fine-tunes)."""
    return cfg.method in ("dpo", "kto") and cfg.precompute_ref and kind == "full"


def reference(cfg: AlignParams, kind: str) -> str:
    """What the preference loss compares the policy with (the metrics' ``reference``)."""
    if cfg.method in REFERENCE_FREE:
        return "none (reference-free)"
    if kind == "adapter":
        return "adapter ref copy"
    return "precomputed log-probs" if precomputes_ref(cfg, kind) else "frozen copy"


def _conversational(row: dict[str, Any], enable_thinking: bool) -> dict[str, Any]:
    """The columns TRL's chat rendering reads besides the messages."""
    # tools as JSON text: Arrow would give every schema the union of all schemas' keys
    return {"tools": json.dumps(row["tools"], ensure_ascii=False) if row["tools"] else None,
            "chat_template_kwargs": {"enable_thinking": enable_thinking}}


def _check(dataset: Any, expected: list[tuple[str, dict[str, list[int]]]], split: str) -> None:
    """The ids TRL will train on must be ``expected`` (format's), example by example."""
    keys = list(expected[0][1]) if expected else []
    bad = [pid for (pid, want), got in zip(expected, dataset.select_columns(keys), strict=True)
           if any(list(got[k]) != want[k] for k in keys)]
    if bad:
        raise TrainSetupError(f"align: {len(bad)} {split} examples render differently in TRL than "
                              f"at format (first pair id {bad[0]}); rerun `dvc repro format`")


# --------------------------------------------------------------------------- dpo
def _dpo(cfg: AlignParams, common: dict[str, Any], precompute: bool,
         data: dict[str, Any]) -> Builder:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common, beta=cfg.beta, loss_type=losses(cfg),
                     loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
                     max_length=None,  # format dropped every pair over format.max_length
                     precompute_ref_log_probs=precompute)

    def dataset(split: str) -> Any:
        return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                                   "rejected": r["rejected"], **_conversational(r, data["thinking"])}
                                  for r in data[split]])

    def expected(split: str) -> list[tuple[str, dict[str, list[int]]]]:
        return [(r["id"], {k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
                for r in data[split]]

    return DPOTrainer, args, dataset, expected


# --------------------------------------------------------------------------- kto
def kto_examples(rows: list[dict[str, Any]], seed: int,
                 unpaired: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """KTO's examples: each pair as a desirable (chosen) and an undesirable (rejected) answer,
    then format's unpaired rows (``label`` true: desirable), in a seeded order: KTO samples
    sequentially (its KL term pairs each prompt with its batch neighbour's answer), so
    without the shuffle a batch would hold one kind only."""
    items = [{"id": r["id"], "prompt": r["prompt"], "tools": r["tools"], "label": label,
              "completion": r["chosen"] if label else r["rejected"],
              "prompt_ids": r["prompt_ids"],
              "completion_ids": r["chosen_ids"] if label else r["rejected_ids"]}
             for r in rows for label in (True, False)]
    items += [{k: r[k] for k in ("id", "prompt", "tools", "label", "completion", "prompt_ids",
                                 "completion_ids")} for r in unpaired]
    random.Random(seed).shuffle(items)
    return items


def _kto(cfg: AlignParams, common: dict[str, Any], precompute: bool,
         data: dict[str, Any]) -> Builder:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    # align.batch_size counts pairs: a KTO batch holds both answers of as many pairs
    sizes = {"per_device_train_batch_size": 2 * cfg.batch_size,
             "per_device_eval_batch_size": 2 * cfg.batch_size}
    args = KTOConfig(**{**common, **sizes}, beta=cfg.beta, loss_type="kto",
                     desirable_weight=cfg.desirable_weight,
                     undesirable_weight=cfg.undesirable_weight,
                     max_length=None, precompute_ref_log_probs=precompute)
    examples = {split: kto_examples(data[split], data["seed"], data[f"{split}_unpaired"])
                for split in ("train", "val")}

    def dataset(split: str) -> Any:
        return Dataset.from_list([{"prompt": e["prompt"], "label": e["label"],
                                   "completion": e["completion"],
                                   **_conversational(e, data["thinking"])}
                                  for e in examples[split]])

    def expected(split: str) -> list[tuple[str, dict[str, list[int]]]]:
        return [(e["id"], {"prompt_ids": e["prompt_ids"], "completion_ids": e["completion_ids"]})
                for e in examples[split]]

    return KTOTrainer, args, dataset, expected


# --------------------------------------------------------------------------- orpo / simpo
def format_ids_row(feature: dict[str, Any]) -> dict[str, list[int]]:
    """ORPO's / CPO's tokenised pair from format's ids: each answer after the prompt, the
    prompt's labels ignored (the keys their collator pads)."""
    prompt = list(feature["prompt_ids"])
    out: dict[str, list[int]] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out


def _reference_free(cfg: AlignParams, common: dict[str, Any], precompute: bool,
                    data: dict[str, Any]) -> Builder:
    from datasets import Dataset

    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Base

        knobs: dict[str, Any] = {"beta": cfg.beta}
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Base

        knobs = {"beta": cfg.beta, "loss_type": "simpo", "simpo_gamma": cfg.simpo_gamma,
                 "cpo_alpha": cfg.sft_weight}

    class Trainer(Base):  # type: ignore[misc, valid-type]
        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list[int]]:
            return format_ids_row(feature)

    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                  for r in data["train"] + data["val"])
    # max_length only feeds TRL's own tokenize_row (replaced); set, it keeps TRL quiet.
    # The collator passes every column through: remove_unused_columns must be off
    args = Config(**common, **knobs, max_length=longest, remove_unused_columns=False)

    def dataset(split: str) -> Any:
        return Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                  for r in data[split]])

    def expected(split: str) -> list[tuple[str, dict[str, list[int]]]]:
        return [(r["id"], {k: v for k, v in format_ids_row(r).items() if "attention" not in k})
                for r in data[split]]

    return Trainer, args, dataset, expected


# --------------------------------------------------------------------------- val metrics
# per-pair means TRL logs batch by batch (dpo, orpo, simpo): averaged over pairs at evaluation
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen")


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of the batches a sequential, non-dropping loader cuts ``n`` examples into."""
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def pair_weighted(per_batch: list[float], sizes: list[int]) -> float:
    """The mean over pairs of a metric logged as one mean per batch of ``sizes`` pairs."""
    if len(per_batch) != len(sizes):
        raise ValueError(f"{len(per_batch)} batch means for {len(sizes)} batches")
    return sum(float(v) * n for v, n in zip(per_batch, sizes, strict=True)) / sum(sizes)


def pair_counts(per_batch: list[float], sizes: list[int]) -> dict[str, int]:
    """``eval_pairs_correct`` / ``eval_pairs_total``: how many of the split's pairs the model
    ranks right, from TRL's per-batch accuracy means (each mean is right pairs / batch size,
    so mean x size is a whole count up to float rounding)."""
    if len(per_batch) != len(sizes):
        raise ValueError(f"{len(per_batch)} batch means for {len(sizes)} batches")
    return {"eval_pairs_correct": sum(round(float(v) * n) for v, n in zip(per_batch, sizes,
                                                                           strict=True)),
            "eval_pairs_total": sum(sizes)}


def pair_weighted_eval(cls: type) -> type:
    """``cls`` whose val metrics are means over pairs. TRL averages its per-batch means, so a
    short last batch weighs as much as a full one (26 val pairs in batches of 8: 14 right
    pairs read 0.53125, not 14/26); each per-batch list is replaced by its pair-weighted mean
    before TRL averages it. The eval loss is already a per-example mean (the Trainer's)."""

    class PairWeighted(cls):  # type: ignore[misc, valid-type]
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "eval_loss" in logs and self.eval_dataset is not None:
                sizes = batch_sizes(len(self.eval_dataset), self.args.per_device_eval_batch_size)
                # DPOTrainer keeps {name: per-batch values} by mode; ORPO/CPO {eval_name: ...}
                store, prefix = ((self._metrics["eval"], "") if hasattr(self, "_metrics")
                                 else (self._stored_metrics["eval"], "eval_"))
                accuracies = store.get(prefix + "rewards/accuracies")
                if accuracies:  # pair-level counts: right pairs of all the split's pairs
                    self.pair_counts = pair_counts([float(v) for v in accuracies], sizes)
                    logs = {**logs, **self.pair_counts}
                for name in PAIR_MEANS:
                    values = store.get(prefix + name)
                    if values:
                        store[prefix + name] = [pair_weighted([float(v) for v in values], sizes)]
            super().log(logs, start_time)

    PairWeighted.__name__ = PairWeighted.__qualname__ = cls.__name__
    return PairWeighted


# --------------------------------------------------------------------------- cached reference
def cached_precompute(cls: type, cache: dict[str, Any], keys: dict[str, list[str]]) -> type:
    """``cls`` (DPOTrainer or KTOTrainer) whose ``_precompute_ref_logps`` returns the
    cached columns beside the dataset, as TRL's own returns the ones it computed."""
    class Cached(cls):  # type: ignore[misc, valid-type]
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            from datasets import Dataset, Features, concatenate_datasets

            split = "train" if name == "train" else "val"
            table = cache.get(split)
            if table is None or table.column("key").to_pylist() != keys[split]:
                raise TrainSetupError(f"align: the cached reference log-probs of the {split} "
                                      f"split do not match its examples; rerun `dvc repro "
                                      f"ref_logps`")
            table = table.drop(["key"])
            cols = Dataset.from_dict(table.to_pydict(),
                                     features=Features.from_arrow_schema(table.schema))
            return concatenate_datasets([dataset, cols], axis=1)

    Cached.__name__ = Cached.__qualname__ = cls.__name__
    return Cached


BUILDERS = {"dpo": _dpo, "kto": _kto, "orpo": _reference_free, "simpo": _reference_free}


def build_trainer(cfg: AlignParams, *, model: Any, tokenizer: Any, common: dict[str, Any],
                  precompute: bool, train_rows: list[dict[str, Any]],
                  val_rows: list[dict[str, Any]], enable_thinking: bool, seed: int,
                  callbacks: list[Any], train_unpaired: list[dict[str, Any]] = (),
                  val_unpaired: list[dict[str, Any]] = (),
                  ref_cache: dict[str, Any] | None = None) -> Any:
    """The TRL trainer of ``cfg.method`` on the pairs (kto: and the unpaired rows), its
    training ids checked against format's. ``common`` holds the TrainingArguments every
    method shares. ``ref_cache``: the ref_logps stage's reference log-probs
    (:mod:`reprotune.train.ref_logps`), handed to TRL instead of computing them."""
    data = {"train": train_rows, "val": val_rows, "thinking": enable_thinking, "seed": seed,
            "train_unpaired": list(train_unpaired), "val_unpaired": list(val_unpaired)}
    has_val = bool(val_rows or (cfg.method == "kto" and val_unpaired))
    cls, args, dataset, expected = BUILDERS[cfg.method](cfg, common, precompute, data)
    if cfg.method != "kto":  # KTO logs no pair accuracy; its means are per kind of answer
        cls = pair_weighted_eval(cls)
    # the row id of each example in TRL's order (the ref_logps cache's keys)
    keys = {s: [pid for pid, _ in expected(s)] for s in ("train", "val")}
    if ref_cache is not None and precompute:
        cls = cached_precompute(cls, ref_cache, keys)
    trainer = cls(model=model, args=args, train_dataset=dataset("train"),
                  eval_dataset=dataset("val") if has_val else None,
                  processing_class=tokenizer, callbacks=callbacks)
    _check(trainer.train_dataset, expected("train"), "train")
    if has_val:
        _check(trainer.eval_dataset, expected("val"), "val")
    trainer.reprotune_keys = keys
    return trainer

"""Validated parameters: one typed config object per params.yaml section.

Every stage loads its own section with :func:`load_section` (or the top-level knobs with
:func:`load_top`). Unknown keys, wrong types and out-of-range values raise
:class:`ParamsError` naming the full key (``dedup.threshold``) before any heavy work starts.

params.yaml is read with a YAML 1.2 loader (ruamel.yaml) because ``dvc exp run -S lr=2e-5``
writes ``2e-05``, which YAML 1.1 loaders (PyYAML ``safe_load``) return as a *string*.
Numbers given as strings are also coerced here, so either way ``lr`` is a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from ruamel.yaml import YAML

from reprotune.model_names import PRESETS, is_gguf_name

DEFAULT_PARAMS = Path("params.yaml")
# the file the `demo` stage writes: an ingest.inputs entry that need not exist before `dvc repro`
DEMO_INPUT = "data/raw/demo.jsonl"
T = TypeVar("T")


class ParamsError(ValueError):
    """A parameter is unknown, mistyped or out of range; the message names the key."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open, hi_open)}


def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class TopParams:
    """Top-level knobs (swept with ``dvc exp run -S lr=...``)."""

    method: Literal["full", "freeze", "lora", "qlora", "prompt_tuning", "prefix_tuning"] = "full"
    lr: float = _f(1e-3, **_rng(0, 1, lo_open=True))
    epochs: float = _f(4, **_rng(0, None, lo_open=True))
    batch_size: int = _f(16, **_rng(1, 4096))
    seed: int = _f(42, **_rng(0, 2**32 - 1))


@dataclass(frozen=True)
class DemoParams:
    # tiny: tasks the embedded 2-layer model can learn; assistant: the same plus hand-written
    # self-cognition rows for a pretrained model (reprotune.data.demo_assistant)
    kind: Literal["tiny", "assistant"] = "tiny"
    rows: int = _f(2400, **_rng(10, 10_000_000))
    seed: int = _f(0, **_rng(0, 2**32 - 1))


@dataclass(frozen=True)
class TaskParams:
    """One task of a mixture: the ingest.inputs files that hold its rows, and its weight."""

    inputs: list[str] = _f([])
    # the task's share of the train rows under strategy interleave (relative to the others)
    weight: float = _f(1.0, **_rng(0, None, lo_open=True))


@dataclass(frozen=True)
class MixtureParams:
    # concat: every train row once (tasks only label the rows, for the split and evaluation);
    # interleave: the train split resampled so each task's share follows its weight
    # (reprotune.data.mixture, docs/data.md "Mixtures")
    strategy: Literal["concat", "interleave"] = "concat"
    seed: int = _f(0, **_rng(0, 2**32 - 1))
    # task name -> {inputs, weight}; empty: no mixture (records carry no task)
    tasks: dict[str, TaskParams] = _f({})


@dataclass(frozen=True)
class IngestParams:
    # files under data/raw/; a hub dataset is a `*.hub.yaml` manifest (reprotune.data.hub)
    inputs: list[str] = _f([DEMO_INPUT])
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    columns: dict[str, str] = _f({})
    label_field: str | None = "label"
    group_field: str | None = "group"
    # a file keeping less than this share of its rows fails the stage (naming the file)
    min_kept_ratio: float = _f(0.5, **_rng(0, 1))
    # raw fields kept verbatim in each record's `meta` (e.g. a timestamp for split.order_by)
    keep_fields: list[str] = _f([])
    # tasks and weights of the inputs (a separate mapping: `read` iterates over inputs)
    mixture: MixtureParams = field(default_factory=MixtureParams)


@dataclass(frozen=True)
class TinyModelParams:
    vocab: int = _f(2048, **_rng(300, 200_000))
    hidden: int = _f(128, **_rng(8, 16384))
    layers: int = _f(2, **_rng(1, 256))
    heads: int = _f(4, **_rng(1, 256))
    kv_heads: int = _f(2, **_rng(1, 256))
    head_dim: int = _f(32, **_rng(4, 1024))
    intermediate: int = _f(384, **_rng(8, 65536))
    max_positions: int = _f(1024, **_rng(16, 1_000_000))


@dataclass(frozen=True)
class ModelParams:
    # tiny | a preset (reprotune.model_sources.PRESETS) | hub id | model folder | .gguf file
    name: str = "tiny"
    # a GGUF file inside the model.name folder (or give the .gguf path as model.name)
    gguf_file: str | None = None
    trust_remote_code: bool = False
    seed: int = _f(0, **_rng(0, 2**32 - 1))
    tiny: TinyModelParams = field(default_factory=TinyModelParams)


# the PII types the redact stage detects (reprotune.data.pii), in the order a row dropped for
# several of them is counted under the first
PII_TYPES = ("ID_CARD", "BANK_CARD", "PHONE", "EMAIL", "IP", "SECRET")
PII_ACTIONS = ("mask", "drop", "keep")


@dataclass(frozen=True)
class RedactParams:
    enabled: bool = True
    # per type: mask (replace with <TYPE>), drop (the whole row) or keep; types left out: mask
    policy: dict[str, Literal["mask", "drop", "keep"]] = _f({t: "mask" for t in PII_TYPES})
    # masked spans written per type to the review file (with context), first ones in input order
    review_per_type: int = _f(20, **_rng(0, 100_000))

    def action(self, pii_type: str) -> str:
        return self.policy.get(pii_type, "mask")


@dataclass(frozen=True)
class DedupParams:
    threshold: float = _f(0.85, **_rng(0, 1, lo_open=True))
    # rows with fewer content characters are compared on exact keys only (dedup.py says why)
    near_min_chars: int = _f(20, **_rng(0, None))
    ngram_min: int = _f(2, **_rng(1, 10))
    ngram_max: int = _f(4, **_rng(1, 10))
    num_perm: int = _f(128, **_rng(8, 1024))
    bands: int = _f(32, **_rng(1, 1024))
    min_chars: int = _f(1, **_rng(0, None))
    max_chars: int = _f(20000, **_rng(1, None))
    max_repetition: float = _f(0.5, **_rng(0, 1, lo_open=True))
    sample_pairs: int = _f(50, **_rng(0, 100_000))


@dataclass(frozen=True)
class DataParams:
    # processes of the data stages' batched `datasets` map; "auto": every core this process
    # may run on. Outputs never depend on it (rows are processed alone, results kept in order)
    # (resolved to a number by reprotune.runtime.data_processes: params knows no machine)
    num_proc: int | Literal["auto"] = _f("auto", **_rng(1, 1024))


@dataclass(frozen=True)
class FormatParams:
    # "auto": the p99 of the rendered lengths, capped by the model's context length
    max_length: int | Literal["auto"] = _f("auto", **_rng(8, 1_000_000))
    enable_thinking: bool = False
    # warn (stage summary + metric) when more than this share of rows is truncated
    warn_truncated: float = _f(0.05, **_rng(0, 1))
    # label the think blocks (reasoning_content) the chat template renders; false: the
    # model sees the reasoning as context and learns only the answers
    train_reasoning: bool = True
    # chat: conversations through the chat template, assistant turns labelled; text: plain
    # documents for continued pretraining (no template, EOS between documents, packed to
    # max_length, every token labelled; reprotune.data.text_packing)
    mode: Literal["chat", "text"] = "chat"


@dataclass(frozen=True)
class SplitParams:
    val_ratio: float = _f(0.1, **_rng(0, 1, hi_open=True))
    test_ratio: float = _f(0.1, **_rng(0, 1, hi_open=True))
    stratify: str | None = "label"
    group: str | None = "group"
    leakage_threshold: float = _f(0.7, **_rng(0, 1, lo_open=True))
    # val/test rows with a near-duplicate in an earlier split: counted, dropped or fatal
    on_leak: Literal["report", "drop", "fail"] = "drop"
    # a kept raw field (ingest.keep_fields): oldest rows train, newest test; null = seeded
    order_by: str | None = None
    seed: int = _f(0, **_rng(0, 2**32 - 1))
    # record ids (the `id` of data/interim/*.jsonl) left out after a review (make audit):
    # counted in metrics/split.json, never deleted from the data
    exclude_ids: list[str] = _f([])


@dataclass(frozen=True)
class TrainParams:
    max_steps: int = _f(-1, **_rng(-1, None))
    eval_steps: int = _f(25, **_rng(1, None))
    # val rows the train stage evaluates, before step 1 and at each evaluation: evenly
    # spaced over the val split, the same rows every time (train/data.py); 0 = all
    eval_rows: int = _f(64, **_rng(0, None))
    logging_steps: int = _f(5, **_rng(1, None))
    patience: int = _f(4, **_rng(0, None))
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = _f(0.05, **_rng(0, 1))
    weight_decay: float = _f(0.0, **_rng(0, 10))
    grad_accum: int = _f(1, **_rng(1, 4096))
    max_grad_norm: float = _f(1.0, **_rng(0, None))
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # portable: bit-reproducible CPU runs (fp32); fast: precision auto = bf16 on a CPU with
    # native bf16 (results specific to that CPU type); same on CUDA (train/speed.py)
    mode: Literal["portable", "fast"] = "portable"
    # auto = packs on CUDA, padding_free on CPU; true = packs of tokens_per_batch tokens;
    # padding_free = batch_size rows joined without padding (training.py, packing.py)
    packing: Literal["auto", True, False, "padding_free"] = "auto"
    tokens_per_batch: int = _f(16384, **_rng(16, 10_000_000))
    # auto: liger (CUDA, if installed) > chunked; stock = the model's own logits + loss
    loss_impl: Literal["auto", "stock", "chunked", "liger"] = "auto"
    torch_compile: bool = False
    # python: this process trains; accelerate: the stage re-runs itself under `accelerate
    # launch` in num_processes processes with accelerate_config (train/launch.py)
    launcher: Literal["python", "accelerate"] = "python"
    num_processes: int = _f(1, **_rng(1, 1024))
    accelerate_config: str = "configs/accelerate/ddp.yaml"
    # how long a collective waits for the other ranks before the run fails
    collective_timeout_s: int = _f(600, **_rng(10, 86400))


@dataclass(frozen=True)
class LoraParams:
    r: int = _f(16, **_rng(1, 4096))
    alpha: float = _f(32, **_rng(0, None, lo_open=True))
    dropout: float = _f(0.0, **_rng(0, 1, hi_open=True))
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    use_dora: bool = False
    use_rslora: bool = False


@dataclass(frozen=True)
class QloraParams:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass(frozen=True)
class FreezeParams:
    trainable_layers: int = _f(1, **_rng(1, None))
    train_norm: bool = True
    train_lm_head: bool = False


@dataclass(frozen=True)
class PromptParams:
    num_virtual_tokens: int = _f(16, **_rng(1, 4096))


@dataclass(frozen=True)
class EvalParams:
    # "auto": the p95 of the reference answers' token lengths of the evaluated rows
    max_new_tokens: int | Literal["auto"] = _f("auto", **_rng(1, 32768))
    batch_size: int = _f(32, **_rng(1, 4096))
    max_rows: int = _f(0, **_rng(0, None))
    do_sample: bool = False
    temperature: float = _f(0.7, **_rng(0, 10, lo_open=True))
    top_p: float = _f(0.9, **_rng(0, 1, lo_open=True))
    bleu_tokenize: Literal["auto", "zh", "13a", "intl", "char", "none"] = "auto"
    task: Literal["auto", "generation", "classification"] = "auto"
    report_examples: int = _f(5, **_rng(0, 1000))
    # warn (stage summary + metric) when more than this share of predictions hits the cap
    warn_capped: float = _f(0.25, **_rng(0, 1))
    # generation batches shared out over this many processes (GPUs; CPU cores here), same result
    num_processes: int = _f(1, **_rng(1, 1024))
    # the forgetting check: JSONL {"text": ...} rows no stage trains on, scored by eval_base
    # and evaluate (reprotune.evaluate.forgetting); a DVC dependency of both
    general_text: str = "data/reference/general_text.jsonl"


# TRL 1.16 DPOTrainer's loss_type values (trl/trainer/dpo_config.py)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
              "sigmoid_norm")


@dataclass(frozen=True)
class AlignParams:
    # none: the SFT model passes through untouched; dpo: TRL's DPOTrainer on the pairs;
    # orpo / simpo (reference-free) and kto: reprotune.train.align_methods
    method: Literal["none", "dpo", "orpo", "simpo", "kto"] = "none"
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]  # dpo only
    beta: float = _f(0.1, **_rng(0, None, lo_open=True))
    lr: float = _f(5e-6, **_rng(0, 1, lo_open=True))
    epochs: float = _f(1, **_rng(0, None, lo_open=True))
    batch_size: int = _f(8, **_rng(1, 4096))
    # weight of TRL's `sft` loss (NLL of chosen) added to the preference loss: keeps small
    # models' chosen log-probs from falling; 0 = pure preference loss
    sft_weight: float = _f(0.0, **_rng(0, None))
    max_steps: int = _f(-1, **_rng(-1, None))
    eval_steps: int = _f(25, **_rng(1, None))
    logging_steps: int = _f(5, **_rng(1, None))
    patience: int = _f(4, **_rng(0, None))
    warmup_ratio: float = _f(0.0, **_rng(0, 1))
    # full fine-tunes: reference log-probs computed once before training (no frozen copy in
    # memory); adapters use the policy with the DPO adapter switched off either way
    precompute_ref: bool = True
    # simpo: target reward margin gamma (TRL's simpo_gamma; the loss compares beta * the
    # length-normalised log-prob margin with gamma)
    simpo_gamma: float = _f(0.5, **_rng(0, None))
    # kto: weights of the desirable (chosen) and undesirable (rejected) losses
    desirable_weight: float = _f(1.0, **_rng(0, None, lo_open=True))
    undesirable_weight: float = _f(1.0, **_rng(0, None, lo_open=True))


@dataclass(frozen=True)
class QuantizeParams:
    methods: list[Literal["int8_dynamic", "bnb_int8", "bnb_nf4", "gguf_f16", "gguf_q8_0",
                          "onnx_fp32", "onnx_int8"]] = _f(
        # onnx_fp32 / onnx_int8 are opt-in: an export and an ONNX Runtime session per run
        ["int8_dynamic", "bnb_int8", "bnb_nf4", "gguf_f16", "gguf_q8_0"])
    keep_full_precision: list[str] = _f(["embed_tokens", "lm_head"])
    eval_rows: int = _f(0, **_rng(0, None))


SECTIONS: dict[str, type] = {
    "demo": DemoParams,
    "ingest": IngestParams,
    "model": ModelParams,
    "dedup": DedupParams,
    "redact": RedactParams,
    "data": DataParams,
    "format": FormatParams,
    "split": SplitParams,
    "train": TrainParams,
    "lora": LoraParams,
    "qlora": QloraParams,
    "freeze": FreezeParams,
    "prompt": PromptParams,
    "eval": EvalParams,
    "quantize": QuantizeParams,
    "align": AlignParams,
}
TOP_KEYS = tuple(f.name for f in dataclasses.fields(TopParams))


# --------------------------------------------------------------------------- coercion
def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ParamsError naming ``key``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in get_args(tp):
                return None
            raise ParamsError(f"{key}: must not be null")
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for arg in args:  # e.g. int | Literal["auto"]: the first type that takes the value
            try:
                return _coerce(value, arg, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key}: {value!r} is not {' or '.join(_describe(a) for a in args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        for i, v in enumerate(items):  # every list param is a set of names: once each
            if v in items[:i]:
                raise ParamsError(f"{key}[{i}]: {v!r} is listed twice (also {key}"
                                  f"[{items.index(v)}]); list each entry once")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, v_tp = get_args(tp)
        return {str(k): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamsError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ParamsError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:  # `dvc exp run -S lr=2e-5` may reach us as the string "2e-05"
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isnan(number):
            # NaN passes every `<`/`>` range test, so it must be refused by name
            raise ParamsError(f"{key}: {value!r} is not a number (NaN); give a finite value")
        if number is not None:
            return number
        raise ParamsError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported param type {tp!r} for {key}")  # programming error


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(c) for c in get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check_range(value: Any, meta: dict[str, Any], key: str) -> None:
    if "range" not in meta or isinstance(value, str) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_open, hi_open = meta["range"]
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ParamsError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ParamsError(f"{key}: {value!r} must be {'<' if hi_open else '<='} {hi}")


def build(cls: type[T], raw: Any, prefix: str) -> T:
    """Build dataclass ``cls`` from mapping ``raw``; keys are reported as ``prefix.key``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ParamsError(f"{prefix}.{k}: unknown key{_suggest(str(k), fields)}; "
                              f"known keys: {', '.join(fields)}")
    if cls is IngestParams:
        _check_hub_entries(raw.get("inputs"), f"{prefix}.inputs")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        val = _coerce(raw[name], hints[name], key)
        _check_range(val, dict(f.metadata), key)
        kwargs[name] = val
    obj = cls(**kwargs)
    _cross_checks(obj, prefix)
    return obj


def _check_hub_entries(inputs: Any, key: str) -> None:
    """A hub dataset written straight into ingest.inputs (an inline mapping, or a bare
    ``owner/name``) cannot be a DVC dependency: point at the manifest form instead."""
    if not isinstance(inputs, list):
        return
    for i, entry in enumerate(inputs):
        bare = isinstance(entry, str) and not Path(entry).suffix and len(Path(entry).parts) == 2 \
            and Path(entry).parts[0] != "data"
        if not (isinstance(entry, dict) or bare):
            continue
        hub = (entry.get("hub") if isinstance(entry, dict) else entry) or "owner/name"
        name = str(hub).rsplit("/", 1)[-1]
        split = entry.get("split", "train") if isinstance(entry, dict) else "train"
        raise ParamsError(
            f"{key}[{i}]: {entry!r} is not a file; DVC needs a file per input, so declare a hub "
            f"dataset in a manifest and list that: data/raw/{name}.hub.yaml holding `hub: {hub}`, "
            f"`split: {split}`, `revision: <40-hex commit sha>` (and `subset:` if any), written "
            f"by python -m reprotune.data.hub pin {hub} --split {split} --out "
            f"data/raw/{name}.hub.yaml")


def _cross_checks(obj: Any, prefix: str) -> None:
    """Constraints that involve more than one key of a section."""
    if isinstance(obj, RedactParams):
        for key in obj.policy:
            if key not in PII_TYPES:
                raise ParamsError(f"{prefix}.policy.{key}: unknown PII type"
                                  f"{_suggest(key, PII_TYPES)}; known: {', '.join(PII_TYPES)}")
    if isinstance(obj, DedupParams):
        if obj.ngram_min > obj.ngram_max:
            raise ParamsError(f"{prefix}.ngram_min: {obj.ngram_min} must be <= "
                              f"{prefix}.ngram_max ({obj.ngram_max})")
        if obj.num_perm % obj.bands:
            raise ParamsError(f"{prefix}.bands: {obj.bands} must divide "
                              f"{prefix}.num_perm ({obj.num_perm})")
    if isinstance(obj, SplitParams) and obj.val_ratio + obj.test_ratio >= 1:
        raise ParamsError(f"{prefix}.val_ratio + {prefix}.test_ratio must be < 1, got "
                          f"{obj.val_ratio} + {obj.test_ratio}")
    if isinstance(obj, TinyModelParams) and obj.heads % obj.kv_heads:
        raise ParamsError(f"{prefix}.kv_heads: {obj.kv_heads} must divide "
                          f"{prefix}.heads ({obj.heads})")
    if isinstance(obj, TrainParams) and not (obj.packing in ("auto", "padding_free")
                                             or isinstance(obj.packing, bool)):
        # the Literal would also let 1 and 0 through (1 == True)
        raise ParamsError(f"{prefix}.packing: {obj.packing!r} is not one of auto, true, false, "
                          f"padding_free")
    if isinstance(obj, TrainParams):
        if obj.launcher == "python" and obj.num_processes > 1:
            raise ParamsError(f"{prefix}.num_processes: {obj.num_processes} processes need "
                              f"{prefix}.launcher: accelerate (python runs one process)")
        cfg = Path(obj.accelerate_config)
        if cfg.is_absolute() or cfg.parts[:1] != ("configs",) or ".." in cfg.parts or \
                cfg.suffix not in (".yaml", ".yml"):
            raise ParamsError(f"{prefix}.accelerate_config: {obj.accelerate_config!r} must be a "
                              f".yaml file under configs/, e.g. configs/accelerate/ddp.yaml")
    if isinstance(obj, AlignParams):
        if obj.method not in ("none", "dpo") and obj.loss_type != "sigmoid":
            raise ParamsError(f"{prefix}.loss_type: {obj.loss_type} is a DPO loss; "
                              f"{prefix}.method {obj.method} has its own (set it back to sigmoid)")
        if obj.method in ("orpo", "kto") and obj.sft_weight > 0:
            raise ParamsError(f"{prefix}.sft_weight: {obj.sft_weight:g} has no effect with "
                              f"{prefix}.method {obj.method} ("
                              + ("its loss always includes the NLL of chosen" if obj.method == "orpo"
                                 else "TRL's KTO has no SFT term") + "); set it to 0")
    if isinstance(obj, IngestParams) and obj.mixture.tasks:
        _check_mixture(obj.mixture, obj.inputs, f"{prefix}.mixture")
    if isinstance(obj, LoraParams) and not obj.target_modules:
        raise ParamsError(f"{prefix}.target_modules: must name at least one module")


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _check_mixture(mix: MixtureParams, inputs: list[str], key: str) -> None:
    """Every task names files of ``ingest.inputs``, each file belongs to exactly one task,
    and task names are plain words (they become metric keys and ``-S`` paths)."""
    owner: dict[str, str] = {}
    for name, task in mix.tasks.items():
        if not TASK_NAME.fullmatch(name):
            raise ParamsError(f"{key}.tasks.{name}: a task name is letters, digits, _ and - "
                              f"(at most 64, no dots: it becomes a metric key)")
        if not task.inputs:
            raise ParamsError(f"{key}.tasks.{name}.inputs: lists no file, so the task has no "
                              f"rows; name its files of ingest.inputs, or remove the task")
        for i, path in enumerate(task.inputs):
            if path not in inputs:
                raise ParamsError(f"{key}.tasks.{name}.inputs[{i}]: {path!r} is not in "
                                  f"ingest.inputs{_suggest(path, inputs)}; list it there too")
            if path in owner:
                raise ParamsError(f"{key}.tasks.{name}.inputs[{i}]: {path!r} already belongs "
                                  f"to task {owner[path]!r}; a file's rows have one task")
            owner[path] = name
    for i, path in enumerate(inputs):
        if path not in owner:
            raise ParamsError(f"ingest.inputs[{i}]: {path!r} is in no task of {key}.tasks; "
                              f"with a mixture every input names its task")


# --------------------------------------------------------------------------- loading
def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml with a YAML 1.2 loader and validate ALL of it.

    Every stage loads its sections through here, so a mistake anywhere in the file (an
    ``eval.*`` typo, an unknown top-level ``lrr``) stops whichever stage runs first, before
    it touches an output, instead of surfacing after hours of training.
    """
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.exists():
        raise ParamsError("file not found (run from the repository root)")
    yaml = YAML(typ="safe", pure=True)
    try:
        with path.open(encoding="utf-8") as fh:
            raw = yaml.load(fh) or {}
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{where}not valid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        raise ParamsError("expected a mapping at the top level")
    if _expanded_size(raw) > MAX_VALUES:
        # ruamel keeps an alias as a reference; DVC's own loader expands every one of them
        raise ParamsError(f"its YAML aliases (*name) expand to more than {MAX_VALUES:,} values "
                          f"(an alias bomb): DVC would hang expanding them; write the values "
                          f"out without & anchors and * aliases")
    known = set(SECTIONS) | set(TOP_KEYS)
    for k in raw:
        if k not in known:
            raise ParamsError(f"{k}: unknown top-level key{_suggest(str(k), known)}")
    validate_all(raw)
    return raw


MAX_VALUES = 100_000  # values params.yaml may hold once its YAML aliases are expanded


def _expanded_size(value: Any) -> int:
    """How many values ``value`` holds with every shared (aliased) node counted at each use,
    computed without expanding: once per distinct node (an alias is the same object)."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) not in sizes:
            sizes[id(v)] = 0  # a node holding itself (a recursive alias) counts once
            items = v.values() if isinstance(v, dict) else v
            sizes[id(v)] = min(1 + sum(size(x) for x in items), MAX_VALUES + 1)
        return sizes[id(v)]

    return size(value)


def validate_all(raw: dict[str, Any]) -> None:
    """Validate every section (used by tests and `python -m reprotune.params`)."""
    build(TopParams, {k: raw[k] for k in TOP_KEYS if k in raw}, "")
    built = {name: build(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    _check_mode(built["format"], built["ingest"])
    order_by, kept = built["split"].order_by, built["ingest"].keep_fields
    if order_by and order_by not in kept:
        # the split stage only sees what ingest kept: say so before any stage runs
        raise ParamsError(f"split.order_by: {order_by!r} is not kept by ingest; add it to "
                          f"ingest.keep_fields (now {kept})")


def _check_mode(fmt: FormatParams, ingest: IngestParams) -> None:
    """``format.mode`` against the keys that only make sense for the other mode."""
    if fmt.mode == "text" and ingest.format not in ("auto", "text"):
        raise ParamsError(f"ingest.format: {ingest.format} reads conversations, but format.mode "
                          f"is text (continued pretraining on {{\"text\": ...}} rows or .txt "
                          f"files); set ingest.format: text (or auto), or format.mode: chat")
    if fmt.mode == "chat" and ingest.format == "text":
        raise ParamsError("ingest.format: text reads documents for continued pretraining; set "
                          "format.mode: text to train on them, or ingest.format: auto for "
                          "conversations")
    if fmt.mode == "text" and ingest.mixture.tasks:
        raise ParamsError("ingest.mixture.tasks: a mixture weights and evaluates conversations "
                          "per task; format.mode: text packs documents across rows, so no row "
                          "keeps its task; set ingest.mixture.tasks: {} or format.mode: chat")
    if fmt.mode == "text" and fmt.enable_thinking:
        raise ParamsError("format.enable_thinking: true has no effect with format.mode: text "
                          "(no chat template is applied); set it to false")


def check_paths(raw: dict[str, Any], root: str | Path = ".") -> None:
    """Params that name files or folders must name existing ones (relative to ``root``, the
    repository): ``model.name`` when it is a local path, every ``ingest.inputs`` entry (but
    the demo file, which the `demo` stage writes) and ``train.accelerate_config`` when
    ``train.launcher`` is ``accelerate``. The check stage runs this so that a wrong path stops
    ``dvc repro`` before DVC deletes the outputs of the stage that would read it."""
    root = Path(root)
    model = build(ModelParams, raw.get("model"), "model")
    if model.gguf_file is not None or is_gguf_name(model.name):
        _check_gguf_path(model.name, model.gguf_file, root)
    elif model.name != "tiny" and model.name not in PRESETS:
        _check_model_path(model.name, root, model.trust_remote_code)
    ingest = build(IngestParams, raw.get("ingest"), "ingest")
    for i, entry in enumerate(ingest.inputs):
        path = root / entry
        if entry == DEMO_INPUT:
            continue
        if path.is_dir():
            raise ParamsError(f"ingest.inputs[{i}]: {entry!r} is a folder; list the files in "
                              f"it (.json .jsonl .csv .parquet .txt or a .hub.yaml manifest) one by one")
        if not path.is_file():
            raise ParamsError(f"ingest.inputs[{i}]: {entry!r}: no such file; fix the path "
                              f"(relative to the repository root) or remove the entry")
    general = build(EvalParams, raw.get("eval"), "eval").general_text
    # a changed path is the user's to get right; the shipped default is the repository's (and
    # a dvc.yaml dependency: DVC itself refuses to run without it)
    if general != EvalParams.general_text and not (root / general).is_file():
        raise ParamsError(f"eval.general_text: {general!r}: no such file; name a JSONL file of "
                          f"{{\"text\": ...}} rows (relative to the repository root), e.g. the "
                          f"shipped data/reference/general_text.jsonl")
    train = build(TrainParams, raw.get("train"), "train")
    if train.launcher == "accelerate" and not (root / train.accelerate_config).is_file():
        have = sorted(p.relative_to(root).as_posix()
                      for p in (root / "configs" / "accelerate").glob("*.yaml"))
        raise ParamsError(f"train.accelerate_config: {train.accelerate_config!r}: no such file; "
                          f"use one of {', '.join(have) or 'configs/accelerate/ddp.yaml'}")


def _check_gguf_path(name: str, gguf_file: str | None, root: Path) -> None:
    """``model.name`` a ``.gguf`` file, or a folder holding ``model.gguf_file``: it must exist."""
    if name in PRESETS or name == "tiny":
        raise ParamsError(f"model.gguf_file: only for a GGUF file in a folder; model.name "
                          f"{name!r} brings its own model: remove model.gguf_file")
    base = Path(name).expanduser()
    base = base if base.is_absolute() else root / base
    if gguf_file is not None:
        if not is_gguf_name(gguf_file) or Path(gguf_file).name != gguf_file:
            raise ParamsError(f"model.gguf_file: {gguf_file!r} must be a file name ending in "
                              f".gguf, inside the model.name folder")
        if not base.is_dir():
            raise ParamsError(f"model.name: {name!r}: no such folder (model.gguf_file names a "
                              f"file inside it); fix the path, relative to the repository root")
        base = base / gguf_file
    if not base.is_file():
        have = sorted(p.name for p in base.parent.glob("*.gguf")) if base.parent.is_dir() else []
        raise ParamsError(f"model.{'gguf_file' if gguf_file else 'name'}: {str(base)!r}: no such "
                          f"GGUF file{' (that folder has ' + ', '.join(have) + ')' if have else ''}")


def _check_model_path(name: str, root: Path, trust_remote_code: bool = False) -> None:
    """A ``model.name`` that is a local folder must hold a model (``config.json``); one that
    looks like a path but is no folder is refused; ``owner/name`` that is no local folder is a
    hub id and passes (the base stage fetches or finds it in the HF cache)."""
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ParamsError(f"model.name: {name!r} is a folder without config.json, so no "
                              f"model; name a model folder (as `hf download` or "
                              f"save_pretrained writes it), a hub id like Qwen/Qwen3-0.6B, or tiny")
        from reprotune.model_folder import folder_problem

        problem = folder_problem(path, name, trust_remote_code=trust_remote_code)
        if problem:
            raise ParamsError(problem)
        return
    parts = Path(name).parts
    if name.startswith((".", "/", "~", "\\")) or len(parts) != 2 or ".." in parts \
            or "\\" in name:
        raise ParamsError(f"model.name: {name!r}: no such local folder (paths are relative to "
                          f"the repository root); fix the path, or use a hub id like "
                          f"Qwen/Qwen3-0.6B, a .gguf file, a preset "
                          f"({', '.join(PRESETS)}), or tiny")


_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")
DVC_FILES = ("dvc.yaml", "data/raw/dvc.yaml")  # the pipeline's stage files, from the root


def dvc_params_keys(root: str | Path = ".") -> dict[str, str]:
    """Every params.yaml key the pipeline's dvc.yaml files make DVC read (a stage's
    ``params:`` entry or a ``${...}`` interpolation), with the stage that reads it."""
    keys: dict[str, str] = {}
    for name in DVC_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        from ruamel.yaml.error import YAMLError

        text = path.read_text(encoding="utf-8")
        try:
            stages = (YAML(typ="safe", pure=True).load(text) or {}).get("stages") or {}
        except (YAMLError, AttributeError):  # DVC reports a broken dvc.yaml itself
            continue
        for stage, spec in stages.items():
            spec = (spec.get("do") or spec) if isinstance(spec, dict) else {}
            for entry in spec.get("params") or []:
                if isinstance(entry, str):
                    keys.setdefault(entry, stage)
                elif isinstance(entry, dict):
                    for file, listed in entry.items():
                        if str(file).endswith("params.yaml") and isinstance(listed, list):
                            keys.update({str(k): stage for k in listed if str(k) not in keys})
        for match in _INTERPOLATION.finditer(text):
            if match.group(1).split(".")[0] not in ("item", "key"):  # foreach's own names
                keys.setdefault(match.group(1), "(interpolated)")
    return keys


def check_dvc_keys(raw: dict[str, Any], root: str | Path = ".") -> None:
    """DVC reads each stage's params from params.yaml itself, not from the defaults here:
    every key dvc.yaml names must be in the file, or ``dvc repro`` fails inside DVC."""
    missing = {}
    for key, stage in dvc_params_keys(root).items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is _MISSING:
            missing[key] = stage
    if not missing:
        return
    if not raw:
        raise ParamsError(f"the file is empty, but dvc.yaml has DVC read {len(missing)} keys "
                          f"from it ({', '.join(list(missing)[:4])}, ...); restore it: git "
                          f"checkout params.yaml")
    key, stage = next(iter(missing.items()))
    raise ParamsError(f"{key}: missing, and dvc.yaml's stage {stage} has DVC read it from this "
                      f"file (DVC does not know reprotune's defaults); add it (its default is in "
                      f"docs/params.md; `git show HEAD:params.yaml` has the shipped file)")


_MISSING = object()


def load_top(path: str | Path = DEFAULT_PARAMS) -> TopParams:
    """The top-level training knobs (method, lr, epochs, batch_size, seed)."""
    raw = read_params(path)
    return build(TopParams, {k: raw[k] for k in TOP_KEYS if k in raw}, "")


def load_section(name: str, path: str | Path = DEFAULT_PARAMS) -> Any:
    """One validated section of params.yaml, e.g. ``load_section("dedup")``."""
    if name not in SECTIONS:
        raise ParamsError(f"{name}: no such params section{_suggest(name, SECTIONS)}")
    return build(SECTIONS[name], read_params(path).get(name), name)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config object (for logging and metrics files)."""
    return dataclasses.asdict(cfg)


def main(argv: list[str] | None = None) -> int:
    """`python -m reprotune.params [params.yaml]`: one line, exit status 0 (valid) or 1."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PARAMS
    try:
        raw = read_params(path)
        check_paths(raw, path.parent)
        check_dvc_keys(raw, path.parent)
    except ParamsError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path} is valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

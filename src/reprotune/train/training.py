"""The training loop: HF Trainer, loss curves, resumable checkpoints, final artifacts.

:func:`train_model` runs one fine-tuning job from the split Parquet files:

* the splits are checked and read as memory-mapped Arrow (:mod:`reprotune.train.data`): rows
  are numpy views pulled per batch, never Python lists of the whole split;
* loss only on assistant tokens: ``labels`` come from the format stage (-100 elsewhere) and
  :class:`PaddingCollator` pads them with -100 too;
* one evaluation before training (``initial_val_loss``), then every ``train.eval_steps`` and
  at the last step, each on the same ``train.eval_rows`` val rows; early stopping after
  ``train.patience`` evaluations without a better val loss; the best checkpoint is restored;
* checkpoints go to their own directory with a fingerprint of params + data + base model.
  A rerun with the same fingerprint resumes from the latest complete checkpoint; another
  fingerprint clears them. A finished run deletes its checkpoints (the run state stays,
  marked finished, so the next run starts fresh without a warning). Resuming reads the
  Trainer's optimizer/scheduler/RNG ``.pt`` files with ``torch.load(weights_only=True)``
  (the Trainer's own safe loader); they are this pipeline's own files, never downloads;
* curves (train/val loss, learning rate, grad norm) are written in DVC's plot layout by
  :mod:`reprotune.train.curves` (no dvclive: it would import DVC into every training
  process, which a GPU machine without DVC lacks). Throughput is measured
  per logging interval but kept out of the curves (a tracked output must not change when
  the same run is repeated): its median is ``tokens_per_s_steady`` in the metrics, which
  the stage moves to the untracked timing file;
* a base whose validation loss is not finite (corrupt weights) or a run whose loss turns
  NaN/inf stops with one line naming the folder or ``lr``;
* the fast paths (:mod:`reprotune.train.speed`): padding-free packing of the train split
  (:mod:`reprotune.train.packing`, ``train.packing``), a loss without the batch's full logits
  (:mod:`reprotune.train.lean_loss`, ``train.loss_impl``), fused AdamW, optional compilation;
  a fast path that fails is logged once and named in ``fast_path_fallbacks``
  (:mod:`reprotune.train.fallbacks`), never silently slow.
  The metrics record which ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.constants import IGNORE_INDEX
from reprotune.params import (
    FreezeParams,
    LoraParams,
    PromptParams,
    QloraParams,
    TopParams,
    TrainParams,
)
from reprotune.train import curves, distributed
from reprotune.train.cpu import cpu_bf16
from reprotune.train.data import (
    PaddingCollator,
    check_sizes,
    eval_subset,
    load_splits,
    scratch_dir,
    split_size,
)
from reprotune.train.loading import save_finetuned
from reprotune.train.methods import (
    TrainSetupError,
    check_method,
    load_base,
    prepare_model,
    trainable_summary,
    virtual_tokens,
)

log = logging.getLogger(__name__)

RUN_STATE_FILE = "reprotune_run.json"      # in the checkpoint dir: fingerprint + initial loss
COUNTERS_FILE = "reprotune_counters.json"  # in each checkpoint: label tokens seen so far
LIVE_METRICS = ("train_loss", "val_loss", "learning_rate", "grad_norm")
LAUNCH_KEYS = ("launcher", "num_processes", "accelerate_config", "collective_timeout_s")


@dataclass(frozen=True)
class RunConfig:
    """Everything from params.yaml that shapes a training run."""

    top: TopParams = field(default_factory=TopParams)
    train: TrainParams = field(default_factory=TrainParams)
    lora: LoraParams = field(default_factory=LoraParams)
    qlora: QloraParams = field(default_factory=QloraParams)
    freeze: FreezeParams = field(default_factory=FreezeParams)
    prompt: PromptParams = field(default_factory=PromptParams)
    enable_thinking: bool = False
    group_by_length: bool = False

    def relevant(self) -> dict[str, Any]:
        """The params that matter for this method (the run fingerprint's params part)."""
        method = self.top.method
        train = dataclasses.asdict(self.train)
        # how the run is launched matters only under accelerate: a one-process run's params
        # (its fingerprint and lineage record) stay what they were before these keys existed
        launch = {k: train.pop(k) for k in LAUNCH_KEYS}
        out: dict[str, Any] = {"top": dataclasses.asdict(self.top), "train": train,
                               "group_by_length": self.group_by_length}
        if self.train.launcher != "python":
            out["launch"] = launch
        if method in ("lora", "qlora"):
            out["lora"] = dataclasses.asdict(self.lora)
        if method == "qlora":
            out["qlora"] = dataclasses.asdict(self.qlora)
        if method == "freeze":
            out["freeze"] = dataclasses.asdict(self.freeze)
        if method in ("prompt_tuning", "prefix_tuning"):
            out["prompt"] = dataclasses.asdict(self.prompt)
        return out


# --------------------------------------------------------------------------- run identity
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(cfg: RunConfig, train_path: str | Path, val_path: str | Path,
                    base_dir: str | Path) -> str:
    """sha256 over the relevant params, both splits and every file of the base model dir."""
    base = Path(base_dir)
    payload = {"params": cfg.relevant(), "train": sha256_file(train_path),
               "val": sha256_file(val_path),
               "base": {str(p.relative_to(base)): sha256_file(p)
                        for p in sorted(base.rglob("*")) if p.is_file()}}
    if cfg.train.launcher != "python":  # the strategy shapes the checkpoints' files
        configs = Path(cfg.train.accelerate_config).parents[-2]  # configs/ (and its DeepSpeed JSON)
        payload["launch_configs"] = {str(p): sha256_file(p) for p in sorted(configs.rglob("*"))
                                     if p.is_file()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _complete(ckpt: Path) -> bool:
    # the Trainer writes trainer_state.json last, our counters right after it
    return (ckpt / "trainer_state.json").is_file() and (ckpt / COUNTERS_FILE).is_file()


def step_of(ckpt: Path) -> int:
    """The global step of a ``checkpoint-<step>`` folder."""
    return int(ckpt.name.rsplit("-", 1)[-1])


def resume_point(ckpt_dir: Path, fingerprint: str) -> tuple[Path | None, dict[str, Any]]:
    """Latest complete checkpoint of this run config (or None) and the run state.

    Checkpoints of another config are cleared (with a warning: an interrupted run's work is
    lost; a finished run left none); half-written ones are removed.
    """
    state_file = ckpt_dir / RUN_STATE_FILE
    state = io.read_json(state_file) if state_file.is_file() else {}
    if state.get("fingerprint") != fingerprint:
        if any(ckpt_dir.glob("checkpoint-*")):
            log.warning("checkpoints in %s belong to another run config (fingerprint %s, now %s); "
                        "clearing them and starting fresh", ckpt_dir,
                        str(state.get("fingerprint"))[:12], fingerprint[:12])
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        state = {"fingerprint": fingerprint, "status": "running", "initial_val_loss": None}
    ckpts = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir()), key=step_of)
    for p in [p for p in ckpts if not _complete(p)]:
        log.warning("removing incomplete checkpoint %s (interrupted while saving)", p)
        shutil.rmtree(p)
    done = [p for p in ckpts if p.exists()]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state["status"] = "running"
    io.write_json(state_file, state)
    return (done[-1] if done else None), state


def finish_checkpoints(ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Delete the checkpoints of a finished run (and what else the trainer wrote there, e.g.
    TRL's model card), keeping only its run state file."""
    for p in ckpt_dir.iterdir():
        if p.name != RUN_STATE_FILE:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    io.write_json(ckpt_dir / RUN_STATE_FILE, {**state, "status": "finished"})


# --------------------------------------------------------------------------- environment
def resolve_precision(name: str, device: str, mode: str = "portable") -> str:
    """``auto``: bf16 on CUDA that supports it, else fp16 on CUDA; on CPU fp32, or with
    ``train.mode: fast`` bf16 where the CPU computes in bf16 (:func:`.cpu.cpu_bf16`)."""
    import torch

    if device == "cpu":
        if name == "fp16":
            raise TrainSetupError("train.precision: fp16 needs a CUDA GPU; use auto, fp32 or bf16 "
                                  "on CPU")
        if name == "auto":
            return "bf16" if mode == "fast" and cpu_bf16() else "fp32"
        return name
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def peak_memory(device: str) -> dict[str, Any]:
    """CUDA max_memory_allocated on GPU; the process's peak RSS on CPU (says which)."""
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_memory_kind": "cuda_max_memory_allocated"}
    # Linux reports ru_maxrss in KiB
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process_peak_rss"}


def out_of_memory_advice(cfg: RunConfig, method: str, longest: int, device: str, *,
                         packing: bool = False, loss_impl: str = "stock") -> str:
    """What to change when a batch does not fit in memory, naming the params."""
    t, b, acc = cfg.train, cfg.top.batch_size, cfg.train.grad_accum
    if packing:
        what = f"train.tokens_per_batch: {t.tokens_per_batch}"
        half = max(longest, t.tokens_per_batch // 2)
        tips = [f"train.tokens_per_batch: {half} with train.grad_accum: {acc * 2} (about the "
                f"same tokens per optimizer step; it must stay >= the longest sample, {longest})"]
    else:
        what = f"batch_size: {b}"
        tips = [f"batch_size: {max(1, b // 2)} with train.grad_accum: {acc * 2} (same "
                f"{b * acc} sequences per optimizer step)" if b > 1 else
                "batch_size is already 1"]
        if method not in ("prompt_tuning", "prefix_tuning"):
            tips.append("train.packing: true (no padding; train.tokens_per_batch caps the "
                        "tokens per micro-step)")
    if loss_impl == "stock" and method not in ("prompt_tuning", "prefix_tuning"):
        tips.append("train.loss_impl: chunked (never holds the logits of the whole batch)")
    if not t.gradient_checkpointing:
        tips.append("train.gradient_checkpointing: true")
    tips.append(f"a lower format.max_length (longest sequence now {longest} tokens)")
    if method in ("full", "freeze"):
        tips.append("method: lora or qlora (no optimizer state for the frozen base)")
    return (f"out of memory on {device} with {what} (x train.grad_accum {acc}); "
            f"try " + "; or ".join(tips))


# --------------------------------------------------------------------------- callbacks
def _callback_classes() -> tuple[type, type, type]:
    """TrainerCallback subclasses, built on first use so importing this module stays light."""
    from transformers import TrainerCallback

    class LiveCallback(TrainerCallback):
        """Per-log curves in DVC's plot layout (train/val loss, learning rate, grad norm; see
        :mod:`reprotune.train.curves`); tokens/s of each logging interval is collected in
        ``rates``, not logged (it varies run to run). ``step_s`` sums the wall time of the
        training steps alone: from the end of one step (or of an evaluation or save after
        it) to the end of the next."""

        def __init__(self, live_dir: str | Path, resume: Path | None,
                     main: bool = True) -> None:
            self.live: curves.CurveWriter | None = None  # other ranks than 0 write no curves
            if main:
                if resume is not None:
                    curves.restore(resume, live_dir, step_of(resume))
                self.live = curves.CurveWriter(live_dir, resume=resume is not None)
            self._t: float | None = None
            self._tokens = 0
            self.rates: list[float] = []
            self.step_s = 0.0
            self._step_t: float | None = None

        def _restart_clock(self, state: Any) -> None:
            self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen
            self._step_t = self._t

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if self._step_t is not None:
                self.step_s += now - self._step_t
            self._step_t = now

        def on_train_begin(self, args, state, control, **kw):
            self._restart_clock(state)

        # evaluation and saving are not training throughput
        def on_evaluate(self, args, state, control, **kw):
            self._restart_clock(state)

        def on_save(self, args, state, control, **kw):
            self._restart_clock(state)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.live is None:
                return
            logs = logs or {}
            self.live.step = state.global_step
            if "loss" in logs:
                self.live.log("train_loss", logs["loss"])
                for key in ("learning_rate", "grad_norm"):
                    if key in logs:
                        self.live.log(key, float(logs[key]))
                if self._t is not None and time.perf_counter() > self._t:
                    rate = (state.num_input_tokens_seen - self._tokens) / (time.perf_counter() - self._t)
                    self.rates.append(rate)
                self._restart_clock(state)
            if "eval_loss" in logs:
                self.live.log("val_loss", logs["eval_loss"])
            self.live.summary()

    class EvalAtEnd(TrainerCallback):
        """Evaluate and save at the last step too, so the tail of training can be the best;
        log it too, so the logged train losses cover every step (see :func:`mean_logged_loss`)."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_log = True
                if state.global_step % args.eval_steps:
                    control.should_evaluate = control.should_save = True

    class Counters(TrainerCallback):
        """Store the label-token count next to each checkpoint (resume continues it)."""

        def __init__(self, trainer: Any, live_dir: str | Path) -> None:
            self.trainer, self.live_dir = trainer, live_dir

        def on_save(self, args, state, control, **kw):
            # every rank calls this after its part of the checkpoint, so the sum (a collective)
            # also means the other ranks' files are written before the counters mark it complete
            seen = distributed.sum_over_ranks(self.trainer.label_tokens_seen)
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if distributed.is_main() and ckpt.is_dir():
                curves.snapshot(self.live_dir, ckpt)  # a resumed run continues these curves
                io.write_json(ckpt / COUNTERS_FILE, {"label_tokens_seen": seen})

    return LiveCallback, EvalAtEnd, Counters


def _trainer_class() -> type:
    from transformers import Trainer

    from reprotune.train.packing import model_inputs

    class CountingTrainer(Trainer):
        """Trainer that counts the label (assistant) tokens it trains on and computes the
        loss with ``loss_impl`` (see :mod:`reprotune.train.lean_loss`)."""

        loss_impl = "stock"
        _labels_before = 0    # counted before this session (resume) or already synced
        _labels_device = None  # this session's count, a device tensor: no sync per step

        @property
        def label_tokens_seen(self) -> int:
            """Label tokens trained on (this rank); reading it syncs with the device."""
            pending = 0 if self._labels_device is None else int(self._labels_device)
            return self._labels_before + pending

        @label_tokens_seen.setter
        def label_tokens_seen(self, value: int) -> None:
            self._labels_before, self._labels_device = int(value), None

        def training_step(self, model, inputs, num_items_in_batch=None):
            n = (inputs["labels"] != IGNORE_INDEX).sum()
            self._labels_device = n if self._labels_device is None else self._labels_device + n
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = model_inputs(inputs)
            if self.loss_impl == "stock":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # the lean loss runs inside the model's forward (lean_loss.install), so the
            # Trainer's normalisation and any DDP/FSDP wrapper apply to it unchanged.
            # accelerate puts autocast around the top model's forward once it is prepared;
            # entering it here too covers a model called before that (a nested no-op after)
            with self.accelerator.autocast():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return CountingTrainer


# --------------------------------------------------------------------------- the loop
def training_arguments(cfg: RunConfig, *, output_dir: str | Path, device: str,
                       precision: str, packing: bool = False,
                       padding_free: bool = False) -> Any:
    """TrainingArguments for ``cfg`` (transformers 5 names).

    Packed: a train batch is one pack of up to ``train.tokens_per_batch`` tokens (its
    dataset item), so the per-device train batch size is 1; evaluation stays padded.
    Padding-free: ``batch_size`` rows as unpacked, sampled at random (no length grouping:
    nothing is padded).
    """
    from transformers import TrainingArguments

    t = cfg.train
    scheduler = t.scheduler
    if scheduler == "constant" and t.warmup_ratio > 0:
        scheduler = "constant_with_warmup"
    return TrainingArguments(
        output_dir=str(output_dir), report_to="none", seed=cfg.top.seed, data_seed=cfg.top.seed,
        learning_rate=cfg.top.lr, num_train_epochs=cfg.top.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=1 if packing else cfg.top.batch_size,
        per_device_eval_batch_size=cfg.top.batch_size,
        gradient_accumulation_steps=t.grad_accum, lr_scheduler_type=scheduler,
        # a float in [0, 1) is a ratio of the total steps; 1.0 would read as "1 step"
        warmup_steps=min(t.warmup_ratio, 0.999999), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # fused AdamW (one kernel per step on CUDA; also transformers' default since torch 2.8,
        # so CPU runs are unchanged), named here so that a transformers default cannot move it
        optim="adamw_torch_fused", bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=device == "cpu", activation_checkpointing=t.gradient_checkpointing,
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="steps",
        save_steps=t.eval_steps, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False,
        restore_callback_states_from_checkpoint=True, prediction_loss_only=True,
        label_names=["labels"], remove_unused_columns=False, logging_steps=t.logging_steps,
        logging_first_step=True, include_num_input_tokens_seen="non_padding",
        train_sampling_strategy=("group_by_length" if cfg.group_by_length and not packing
                                 and not padding_free else "random"),
        dataloader_num_workers=0, dataloader_pin_memory=device != "cpu", disable_tqdm=False,
        # how long a collective waits for the other ranks (NCCL; gloo: distributed.init)
        ddp_timeout=t.collective_timeout_s)


def mean_logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean train loss per step over every logged interval, across resumed sessions.

    Each logged ``loss`` is the mean of its interval, so intervals are weighted by their
    length. (The Trainer's own ``training_loss`` only covers the current session.)
    """
    prev, total = 0, 0.0
    for h in log_history:
        if "loss" in h:
            total += h["loss"] * (h["step"] - prev)
            prev = h["step"]
    return total / prev if prev else None


def _steady(rates: list[float]) -> float | None:
    """Median tokens/s over the logging intervals, the first (warm-up) left out."""
    import statistics

    rates = rates[1:] or rates
    return round(statistics.median(rates), 1) if rates else None


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def train_model(*, train_path: str | Path, val_path: str | Path, base_dir: str | Path,
                out_dir: str | Path, checkpoints_dir: str | Path, live_dir: str | Path,
                cfg: RunConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``base_dir`` on the split files; write ``out_dir`` and return the metrics.

    Every check that can fail (method, sizes, rows, LoRA targets, packing budget, layer
    counts) runs before the first training step. ``callbacks`` are extra TrainerCallbacks
    (the throughput benchmark times steps with one). The splits are read memory-mapped from
    Arrow copies in a scratch folder (:mod:`reprotune.train.data`), removed at the end.
    """
    with scratch_dir() as scratch:
        return _train(train_path=train_path, val_path=val_path, base_dir=base_dir,
                      out_dir=out_dir, checkpoints_dir=checkpoints_dir, live_dir=live_dir,
                      cfg=cfg, callbacks=callbacks, scratch=scratch)


def _train(*, train_path: str | Path, val_path: str | Path, base_dir: str | Path,
           out_dir: str | Path, checkpoints_dir: str | Path, live_dir: str | Path,
           cfg: RunConfig, callbacks: list[Any] | None, scratch: Path) -> dict[str, Any]:
    """:func:`train_model`, with ``scratch`` for the memory-mapped splits."""
    import torch
    from transformers import AutoConfig, EarlyStoppingCallback, set_seed

    from reprotune.modeling import BASE_INFO_FILE, load_tokenizer
    from reprotune.train import fallbacks, fused, lean_loss, packed_attention
    from reprotune.train.packing import (
        OFF,
        PACKS,
        PackingCollator,
        PaddingFreeRows,
        pack_stats,
        packed_dataset,
        resolve_packing,
    )
    from reprotune.train.speed import speed_setup

    t0 = time.perf_counter()
    fallbacks.reset()  # this run's failed fast paths (fast_path_fallbacks in the metrics)
    method = check_method(cfg.top.method)
    device = distributed.local_device()  # cuda:<local rank> when several processes share GPUs
    distributed.init(device, cfg.train.collective_timeout_s)
    world = distributed.world_size()
    precision = resolve_precision(cfg.train.precision, device, cfg.train.mode)
    n_train, n_val = split_size(train_path), split_size(val_path)
    style, packing_note = resolve_packing(cfg.train.packing, device, method)
    # packing: packed rows (either style); packs: one token-budget pack per micro-step
    packing, packs = style != OFF, style == PACKS
    # packs: an optimizer step is grad_accum packs (checked once the rows are packed)
    check_sizes(n_train, n_val, 1 if packs else cfg.top.batch_size,
                1 if packs else cfg.train.grad_accum, (str(train_path), str(val_path)),
                1 if packs else world)
    tokenizer = load_tokenizer(base_dir)
    info_file = Path(base_dir) / BASE_INFO_FILE
    sha = template_fingerprint(tokenizer.chat_template or "")
    if info_file.is_file() and io.read_json(info_file).get("chat_template_sha256") != sha:
        raise TrainSetupError(f"{base_dir}: the tokenizer's chat template differs from the one in "
                              f"{BASE_INFO_FILE}; rerun the base stage")
    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    train_rows, val_rows = load_splits(
        (train_path, val_path), scratch, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        extra_positions=virtual_tokens(method, cfg.prompt))
    val_eval = eval_subset(val_rows, cfg.train.eval_rows)  # the rows every evaluation uses
    log.info("evaluating %d of %d val rows (train.eval_rows: %d)", len(val_eval), len(val_rows),
             cfg.train.eval_rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_data: Any = PaddingFreeRows(train_rows) if packing else train_rows
    if packs:
        train_data = packed_dataset(train_rows, cfg.train.tokens_per_batch, cfg.top.seed,
                                    grad_accum=cfg.train.grad_accum, path=str(train_path),
                                    num_processes=world)

    set_seed(cfg.top.seed)  # LoRA / soft-prompt init, dropout; the Trainer re-seeds data order
    model = prepare_model(load_base(base_dir, method, qlora=cfg.qlora, device=device), method,
                          lora=cfg.lora, freeze=cfg.freeze, prompt=cfg.prompt,
                          gradient_checkpointing=cfg.train.gradient_checkpointing)
    speed = speed_setup(model, cfg.train, method, device, packing,  # may refuse loss_impl
                        precision=precision)
    speed.update(packing_style=style, packing_note=packing_note)
    if packs:
        speed.update(pack_stats(train_data, cfg.train.tokens_per_batch))
    # only now, with the LoRA targets, layer counts and fast paths checked: a mistyped param
    # must not clear the checkpoints of an interrupted run before its error is shown
    ckpt_dir = Path(checkpoints_dir)
    args = training_arguments(cfg, output_dir=ckpt_dir, device=device, precision=precision,
                              packing=packs, padding_free=packing and not packs)
    if world > 1:
        _ = args.device  # starts the process group (on CUDA: NCCL with train.collective_timeout_s)
    # rank 0 decides (and clears stale checkpoints); every rank resumes from its answer
    resume, run_state = distributed.broadcast(
        resume_point(ckpt_dir, run_fingerprint(cfg, train_path, val_path, base_dir))
        if distributed.is_main() else None)
    summary = trainable_summary(model)
    log.info("method %s on %s (%s, %d torch threads): %d of %d parameters train (%.4f%%)",
             method, device, precision, torch.get_num_threads(), summary["trainable"],
             summary["total"], 100 * summary["share"])

    LiveCallback, EvalAtEnd, Counters = _callback_classes()
    resume_step = step_of(resume) if resume else None
    live_cb = LiveCallback(live_dir, resume, main=distributed.is_main())
    callbacks = [live_cb, EvalAtEnd(), *(callbacks or [])]
    if cfg.train.patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.patience))
    padded = PaddingCollator(pad_id, 8 if device != "cpu" else None)
    trainer = _trainer_class()(
        model=model, args=args,
        train_dataset=train_data, eval_dataset=val_eval, processing_class=tokenizer,
        # packs for training; evaluation stays padded, so val loss means the same either way
        data_collator=PackingCollator(
            unpacked=padded, pad_id=pad_id,
            # compiled: one pack shape for the whole run, so no recompilation per pack
            pad_to=cfg.train.tokens_per_batch if cfg.train.torch_compile and packs else None)
        if packing else padded,
        callbacks=callbacks)
    trainer.loss_impl = speed["loss_impl"]
    trainer.add_callback(Counters(trainer, live_dir))

    def record_initial(loss: float) -> float:
        """Check and keep the val loss before training (run state: resume reads it)."""
        if not math.isfinite(loss):
            raise TrainSetupError(
                f"{base_dir}: the base model's validation loss is {loss}: its weights are "
                f"probably corrupt (`dvc status` trusts size and time stamps). Restore them "
                f"with `dvc checkout --relink --force {base_dir}` or rebuild them with "
                f"`dvc repro -f base`")
        run_state["initial_val_loss"] = loss
        if distributed.is_main():
            io.write_json(ckpt_dir / RUN_STATE_FILE, run_state)
        log.info("initial val loss %.4f", loss)
        return loss

    try:
        if resume is not None:
            # the count is global: rank 0 carries it on, the others count from zero
            trainer.label_tokens_seen = (io.read_json(resume / COUNTERS_FILE)["label_tokens_seen"]
                                         if distributed.is_main() else 0)
            log.info("resuming from checkpoint %s (global step %d)", resume, resume_step)
            initial = run_state["initial_val_loss"]
            log.info("initial val loss %.4f", initial)
        elif world > 1:
            # An evaluation before train() would leave the model marked as prepared by
            # accelerate, and train() would then skip the DDP wrapper (no gradient sync): the
            # Trainer evaluates at the start of train() instead, after wrapping the model.
            trainer.args.eval_on_start = True
            trainer.add_callback(distributed.first_eval_callback(record_initial))
        else:
            initial = record_initial(trainer.evaluate()["eval_loss"])  # the "before" of "it learned"
        t_train = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError as exc:
        longest = int(max(train_rows.lengths.max(), val_rows.lengths.max()))
        raise TrainSetupError(out_of_memory_advice(cfg, method, longest, device, packing=packs,
                                                   loss_impl=speed["loss_impl"])) from exc
    train_s = time.perf_counter() - t_train
    step_s = live_cb.step_s  # the training steps alone: no evaluation, save or reload
    state = trainer.state
    if resume is None and world > 1:
        initial = run_state["initial_val_loss"]
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    bad = next((h for h in state.log_history
                if not all(math.isfinite(h[k]) for k in ("loss", "eval_loss") if k in h)), None)
    if bad is not None:
        what = ", ".join(f"{name} {bad[k]}" for k, name in (("loss", "train loss"),
                                                             ("eval_loss", "val loss")) if k in bad)
        raise TrainSetupError(f"training diverged: the loss is not finite at step {bad.get('step')} "
                              f"({what}); lower lr ({cfg.top.lr:g}) or raise train.warmup_ratio")
    session_tokens = state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    label_tokens = distributed.sum_over_ranks(trainer.label_tokens_seen)
    memory = peak_memory(device)
    if world > 1:  # the rank that needed the most
        memory["peak_memory_mb"] = distributed.max_over_ranks(memory["peak_memory_mb"])
    metrics = {
        "method": method, "device": device.split(":")[0], "precision": precision,
        "trainable_params": summary["trainable"], "total_params": summary["total"],
        "trainable_share": summary["share"], "train_rows": len(train_rows),
        "val_rows": len(val_rows), "val_rows_evaluated": len(val_eval),
        "train_steps": state.global_step, "max_steps": state.max_steps,
        "epochs_done": round(float(state.epoch or 0), 4),
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": resume_step or 0, "best_step": state.best_global_step,
        "initial_val_loss": _round(initial), "best_val_loss": _round(state.best_metric),
        "final_train_loss": _round(losses[-1]) if losses else None,
        "mean_train_loss": _round(mean_logged_loss(state.log_history)),
        # token counts (and so tokens/s) are the Trainer's sums over every rank
        "tokens_seen": state.num_input_tokens_seen, "label_tokens_seen": label_tokens,
        "tokens_per_s": round(session_tokens / step_s, 1) if step_s > 0 else None,
        "tokens_per_s_steady": _steady(live_cb.rates),
        "train_time_s": round(train_s, 2), "step_time_s": round(step_s, 2),
        "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in speed.items() if k not in ("restore_attention", "bf16_frozen")},
        **memory,
    }
    if packing:  # what packed rows ran (a kernel may have refused them midway), and why
        metrics.update(packed_attention.report(device))
    # every fast path that raised and fell back to a slower one ({} when none did)
    metrics["fast_path_fallbacks"] = fallbacks.report()
    if cfg.train.launcher != "python" or world > 1:
        metrics["distributed"] = distributed.summary(trainer, cfg.top.batch_size,
                                                     cfg.train.grad_accum, packs)
    if speed["restore_attention"]:  # the saved model must load without this process's kernels
        packed_attention.disable(trainer.model, speed["restore_attention"])
    lean_loss.uninstall(model)
    model_out = distributed.saveable_model(trainer)  # FSDP/ZeRO-3: gathered on every rank
    if method == "freeze" and speed["bf16_frozen"]:  # the saved model is the whole model
        fused.restore_frozen(model_out, base_dir, speed["bf16_frozen"])
    if distributed.is_main():  # only rank 0 writes the model, the curves, the run state
        save_finetuned(model_out, tokenizer, out_dir, method=method, base_dir=base_dir,
                       enable_thinking=cfg.enable_thinking, qlora=cfg.qlora)
        finish_checkpoints(ckpt_dir, run_state)
    distributed.barrier()
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
    log.info("val loss %.4f -> best %.4f at step %s; %d steps%s in %.1fs", initial,
             state.best_metric or float("nan"), state.best_global_step, state.global_step,
             " (stopped early)" if metrics["stopped_early"] else "", train_s)
    return metrics

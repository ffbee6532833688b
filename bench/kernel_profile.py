"""Where a training step's time goes: the top kernels of a few steps of the train stage.

Runs :func:`reprotune.train.training.train_model` (``--methods``, default full) on
``bench/train_throughput.py``'s seeded workload and model shape (same flags), profiles
``--profile-steps`` optimizer steps after ``--warmup-steps`` with ``torch.profiler`` and
prints the ``--top`` (15) kernels by self device time (CUDA), or CPU ops by self CPU time
where there is no GPU, with calls, milliseconds and share of the profiled total.

What is counted is what torch's own ``key_averages().table(sort_by="self_cuda_time_total")``
counts as device time (torch/autograd/profiler_util.py, ``_build_table``): events whose
``device_type`` is a device (CUDA, PrivateUse1, MTIA, XPU) and that are not user annotations
(``is_user_annotation``: ``Optimizer.step``, ``ProfilerStep``), plus legacy-profiler CPU
events that carry their kernels' time (``is_legacy``). CPU ops, which also report the device
time of the kernels they launched, are therefore not counted twice. The attributes are read
where they exist (``getattr``), never from the torch version: 2.10 to 2.13 have them all.

Each profiled step is its own profiler session; after each one the table (``--table``) and
the JSON (``--out``, ``"complete": false`` until the last step) are rewritten with the
kernels so far, so a timeout loses at most the step it cut. After the last profiled step the
run stops without evaluating or saving: no checkpoint and no model folder are written (the
train stage's ``save_finetuned`` is a no-op while it runs: ``train_throughput.no_model_folder``).

    python bench/kernel_profile.py --out bench/results/gpu_check/profile_full.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (sets HF offline and the src path)
from train_speed import build_base  # noqa: E402

from reprotune import io  # noqa: E402

DEVICE_TYPES = ("CUDA", "PrivateUse1", "MTIA", "XPU")  # as torch's table counts device time


def _type_name(event: Any) -> str:
    return str(getattr(event, "device_type", "CPU")).rsplit(".", 1)[-1]


def is_device_kernel(event: Any) -> bool:
    """An event whose self device time torch's table counts (module docstring)."""
    if getattr(event, "is_user_annotation", False):
        return False
    kind = _type_name(event)
    return kind in DEVICE_TYPES or (kind == "CPU" and bool(getattr(event, "is_legacy", False)))


def self_time_us(event: Any, device: bool) -> float:
    """Self device time (``device``) or self CPU time in microseconds; the device attribute
    was ``self_cuda_time_total`` before torch 2.4."""
    if not device:
        return float(event.self_cpu_time_total)
    value = getattr(event, "self_device_time_total", None)
    if value is None:
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value)


def accumulate(totals: dict[str, list[float]], events: Any, device: bool) -> None:
    """Add ``events`` (``key_averages()`` of one step) to ``totals``: name -> [calls, us].

    ``device``: device kernels only (:func:`is_device_kernel`); else CPU ops by self CPU
    time, user annotations left out.
    """
    for e in events:
        if device and not is_device_kernel(e):
            continue
        if not device and (getattr(e, "is_user_annotation", False) or _type_name(e) != "CPU"):
            continue
        us = self_time_us(e, device)
        if us > 0:
            row = totals.setdefault(e.key, [0, 0.0])
            row[0] += int(e.count)
            row[1] += us


def top_kernels(totals: dict[str, list[float]], top: int) -> list[dict[str, Any]]:
    """The ``top`` entries of ``totals`` by self time, with their share of the whole."""
    whole = sum(us for _, us in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return [{"kernel": name, "calls": int(calls), "self_ms": round(us / 1000, 3),
             "share": round(us / whole, 4)} for name, (calls, us) in ranked]


def _profiler_callback(start: int, steps: int, on_step: Callable[[int], None]) -> Any:
    import torch
    from transformers import TrainerCallback

    device = torch.cuda.is_available()

    class Profile(TrainerCallback):
        """One torch.profiler session per optimizer step ``start + 1 .. start + steps``;
        after each, the kernels are added to ``totals`` and ``on_step(done)`` writes them.
        After the last, training stops without an evaluation or a save."""

        def __init__(self) -> None:
            self.prof: Any = None
            self.done = 0
            self.totals: dict[str, list[float]] = {}

        def on_step_begin(self, args, state, control, **kw):
            if self.prof is None and self.done < steps and state.global_step >= start:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None:
                return
            if device:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            accumulate(self.totals, self.prof.key_averages(), device)
            self.prof, self.done = None, self.done + 1
            on_step(self.done)
            if self.done >= steps:  # what follows (evaluation, checkpoint) is not profiled
                control.should_training_stop = True
                control.should_save = control.should_evaluate = False

    return Profile()


def table(rows: list[dict[str, Any]], what: str) -> str:
    lines = [f"{'#':>2} {'self ms':>10} {'share':>6} {'calls':>6}  {what}"]
    for i, r in enumerate(rows, 1):
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        lines.append(f"{i:>2} {r['self_ms']:>10.3f} {100 * r['share']:>5.1f}% {r['calls']:>6}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--table", default=None)
    own, rest = ap.parse_known_args(argv)
    args = tt.parse_args(rest)
    # train_throughput's --methods default lists all; the profile is of one (full by default)
    method = "full" if args.methods == "baseline,full,lora,qlora" else args.methods.split(",")[0]
    # the run stops after the last profiled step; steps only has to reach it
    args.steps = max(args.steps, args.warmup_steps + own.profile_steps)
    device = torch.cuda.is_available()
    what = "CUDA kernel (self device time)" if device else "CPU op (self CPU time; no GPU here)"
    command = " ".join(["python", "bench/kernel_profile.py", *argv])
    report: dict[str, Any] = {"method": method, "device_kernels": device,
                              "profiled_steps": 0, "planned_steps": own.profile_steps,
                              "after_steps": args.warmup_steps, "command": command,
                              "complete": False, "run": None, "top": []}
    holder: dict[str, Any] = {}

    def write(done: int) -> None:
        """After each profiled step: the table and the JSON so far (a timeout keeps them)."""
        report["profiled_steps"] = done
        report["top"] = top_kernels(holder["cb"].totals, own.top)
        text = table(report["top"], what)
        if own.table:
            with io.atomic_path(own.table) as tmp_path:
                tmp_path.write_text(text + "\n", encoding="utf-8")
        if args.out:
            io.write_json(args.out, report)
        print(f"kernel_profile: {done} of {own.profile_steps} steps profiled", flush=True)

    # the profile needs no model folder: the stage's final save (a full fine-tune of the
    # 0.6B model writes gigabytes) is skipped while it runs
    with tempfile.TemporaryDirectory(prefix="kernel_profile_") as tmp, tt.no_model_folder():
        root = Path(tmp)
        build_base(root / "base", args)
        per_step = args.tokens_per_batch * args.grad_accum
        rows = tt.workload(max(64, 2 * args.steps * per_step // args.median), args)
        splits = (root / "train.parquet", root / "val.parquet")
        io.write_parquet(splits[0], rows)
        io.write_parquet(splits[1], rows[:2 * args.baseline_batch_size])
        cb = holder["cb"] = _profiler_callback(args.warmup_steps, own.profile_steps, write)
        run = tt.run_stage(method, root / "base", splits, root, args, callbacks=(cb,))
        if cb.done < own.profile_steps:
            raise SystemExit(f"kernel_profile: the run ended before step "
                             f"{args.warmup_steps + own.profile_steps}; raise --steps")
    report.update(complete=True, run=run)
    text = table(report["top"], what)
    print(f"{method}: {own.profile_steps} optimizer steps profiled after {args.warmup_steps}; "
          f"{run.get('tokens_per_s')} tokens/s (profiled steps included); attention "
          f"{run.get('attention')}; loss {run.get('loss_impl')}; fast-path fallbacks "
          f"{run.get('fast_path_fallbacks') or 'none'}")
    print(text)
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

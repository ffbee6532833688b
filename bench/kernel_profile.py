"""Where a training step's time goes: the top kernels of a few steps of the train stage.

Runs :func:`reprotune.train.training.train_model` (``--methods``, default full) on
``bench/train_throughput.py``'s seeded workload and model shape (same flags), profiles
``--profile-steps`` optimizer steps after ``--warmup-steps`` with ``torch.profiler``, and
prints the ``--top`` (15) kernels by self device time (CUDA), or by self CPU time where
there is no GPU, with calls, milliseconds and share of the profiled total. ``--out`` writes
the rows as JSON, ``--table`` the printed table.

    python bench/kernel_profile.py --out bench/results/gpu_check/profile_full.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (sets HF offline and the src path)
from train_speed import build_base  # noqa: E402

from reprotune import io  # noqa: E402


def _profiler_callback(start: int, steps: int) -> Any:
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        """torch.profiler around optimizer steps ``start + 1 .. start + steps``."""

        def __init__(self) -> None:
            self.prof: Any = None
            self.done = False

        def on_step_begin(self, args, state, control, **kw):
            if self.prof is None and not self.done and state.global_step >= start:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and not self.done and state.global_step >= start + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                self.done = True

    return Profile()


def top_kernels(prof: Any, top: int, device: bool) -> list[dict[str, Any]]:
    """The ``top`` events by self device time (``device``) or self CPU time, with shares."""
    def self_time(e: Any) -> float:  # microseconds; the attribute was renamed in torch 2.4
        if not device:
            return float(e.self_cpu_time_total)
        return float(getattr(e, "self_device_time_total", None)
                     or getattr(e, "self_cuda_time_total", 0.0))

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    return [{"kernel": e.key, "calls": int(e.count), "self_ms": round(self_time(e) / 1000, 3),
             "share": round(self_time(e) / total, 4)} for e in events[:top]]


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
    args.steps = max(args.steps, args.warmup_steps + own.profile_steps + 1)
    device = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="kernel_profile_") as tmp:
        root = Path(tmp)
        build_base(root / "base", args)
        per_step = args.tokens_per_batch * args.grad_accum
        rows = tt.workload(max(64, 2 * args.steps * per_step // args.median), args)
        splits = (root / "train.parquet", root / "val.parquet")
        io.write_parquet(splits[0], rows)
        io.write_parquet(splits[1], rows[:2 * args.baseline_batch_size])
        cb = _profiler_callback(args.warmup_steps, own.profile_steps)
        run = tt.run_stage(method, root / "base", splits, root, args, callbacks=(cb,))
        if not cb.done:
            raise SystemExit(f"kernel_profile: the run ended before step "
                             f"{args.warmup_steps + own.profile_steps}; raise --steps")
        top = top_kernels(cb.prof, own.top, device)
    what = "CUDA kernel (self device time)" if device else "CPU op (self CPU time; no GPU here)"
    text = table(top, what)
    command = " ".join(["python", "bench/kernel_profile.py", *argv])
    print(f"{method}: {own.profile_steps} optimizer steps profiled after {args.warmup_steps}; "
          f"{run.get('tokens_per_s')} tokens/s; attention {run.get('attention')}; "
          f"loss {run.get('loss_impl')}")
    print(text)
    report = {"method": method, "device_kernels": device, "profiled_steps": own.profile_steps,
              "after_steps": args.warmup_steps, "command": command, "run": run, "top": top}
    if own.table:
        with io.atomic_path(own.table) as tmp_path:
            tmp_path.write_text(text + "\n", encoding="utf-8")
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

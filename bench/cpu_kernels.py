"""The cost of portable CPU kernels: one fp32 forward+backward step under the pin vs native.

Each setting runs in its own process (MKL and ATen read their settings once): ``portable`` is
what ``import reprotune`` sets (``reprotune.PORTABLE_ENV``: MKL's COMPATIBLE branch, ATen
AVX2), ``native`` sets ``REPROTUNE_NATIVE_CPU=1`` (the CPU's own kernels). A child loads the
model (SmolLM2-135M-Instruct by default: ``$REPROTUNE_SMOLLM2_DIR`` or the pinned wheel), does
one untimed step, then ``--steps`` timed ones on the same seeded batch, and reports CPU time
per step (process time: less sensitive to other load than wall time) and wall time, with a
sha256 of the gradients (equal across runs of one setting, different between settings).
Settings alternate ``--rounds`` times. Prints and writes JSON with the command and the ratio.

    python bench/cpu_kernels.py --out bench/results/cpu_kernels_smollm2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cpu_real_model import default_base  # noqa: E402  (bench/ is the script's folder)

from reprotune import PORTABLE_ENV, io  # noqa: E402

SETTINGS = {"portable": {}, "native": {"REPROTUNE_NATIVE_CPU": "1"}}


def child(base: str, batch: int, length: int, steps: int, threads: int) -> dict[str, Any]:
    """One setting in this process: CPU and wall seconds per step, the gradients' hash."""
    import torch

    from reprotune.modeling import load_model

    torch.set_num_threads(threads)
    model = load_model(base, dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    cpu, wall = [], []
    for i in range(steps + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if i:  # the first step warms up allocator and kernels
            cpu.append(round(time.process_time() - c0, 6))
            wall.append(round(time.perf_counter() - w0, 6))
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return {"cpu_s": cpu, "wall_s": wall,
            "grad_sha256": hashlib.sha256(grads.numpy().tobytes()).hexdigest()[:16],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ.get(k) for k in (*PORTABLE_ENV, "REPROTUNE_NATIVE_CPU")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=60)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.length, args.steps, args.threads)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        # the same SmolLM2 folder bench/cpu_real_model.py trains ($REPROTUNE_SMOLLM2_DIR or
        # the pinned wheel's GGUF)
        base = args.base or str(default_base(Path(tmp)))
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
        for _ in range(args.rounds):
            for name, extra in SETTINGS.items():
                env = {k: v for k, v in os.environ.items()
                       if k not in (*PORTABLE_ENV, "REPROTUNE_NATIVE_CPU")} | extra
                cmd = [sys.executable, __file__, "--child", base, "--batch", str(args.batch),
                       "--length", str(args.length), "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    median = {k: round(statistics.median(x for r in rs for x in r["cpu_s"]), 6)
              for k, rs in runs.items()}
    report = {
        "command": "python bench/cpu_kernels.py " + shlex.join(argv if argv is not None
                                                               else sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "model": base if args.base else "smollm2-135m-instruct",
        "batch": [args.batch, args.length], "threads": args.threads,
        "median_cpu_s_per_step": median,
        "portable_over_native_cpu_time": round(median["portable"] / median["native"], 2),
        "same_bytes_within_setting": {k: len({r["grad_sha256"] for r in rs}) == 1
                                      for k, rs in runs.items()},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.out:
        io.write_json(args.out, report)
    return report


def _cpu_name() -> str:
    from reprotune.cpu_kernels import machine_name

    return machine_name()


if __name__ == "__main__":
    main()

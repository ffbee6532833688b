"""Seconds the train stage spends on one val pass, by ``train.eval_rows``, in one run.

The train stage evaluates the val split before step 1 (``initial_val_loss``) and at every
``train.eval_steps``; ``train.eval_rows`` caps how many rows each pass reads. This times that
pass as the stage runs it: the stage's own ``training_arguments`` (eval batch =
``--batch-size``, fp32 on CPU), its padding collator and :func:`reprotune.train.data.eval_subset`,
on a formatted ``val.parquet`` and a model folder, for each ``--rows`` value (0 = the whole
split, the baseline of the ratio). Wall and CPU seconds, real and padded tokens, the loss and
the load average are printed as a table with the command, and written as JSON (``--out``):
on a shared machine wall time grows with the load, CPU seconds much less.

    python bench/val_pass.py --base models/base --val data/processed/val.parquet \\
        --rows 0 64 --out bench/results/val_pass_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reprotune import io  # noqa: E402
from reprotune.params import TopParams  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def time_pass(model: Any, tokenizer: Any, rows: Any, batch_size: int, scratch: str) -> dict:
    """One val pass as the train stage runs it (Trainer.evaluate, padded batches)."""
    import torch
    from transformers import Trainer

    from reprotune.train.data import PaddingCollator
    from reprotune.train.training import RunConfig, training_arguments

    args = training_arguments(RunConfig(top=TopParams(batch_size=batch_size)),
                              output_dir=Path(scratch) / "ckpt", device="cpu",
                              precision="fp32", packing=False)
    args.disable_tqdm = True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, eval_dataset=rows,
                      data_collator=PaddingCollator(pad), processing_class=tokenizer)
    lengths = [int(x) for x in rows.lengths]
    padded = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    loss = trainer.evaluate()["eval_loss"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rows": len(lengths), "tokens": sum(lengths), "padded_tokens": padded,
            "eval_loss": round(loss, 6), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_avg_1min_before": round(load, 2), "load_avg_1min_after":
            round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="a model folder (the base stage's output)")
    ap.add_argument("--val", required=True, help="a formatted val.parquet")
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 64], help="train.eval_rows values")
    ap.add_argument("--batch-size", type=int, default=16, help="batch_size (eval batch)")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from reprotune.modeling import load_tokenizer
    from reprotune.train.data import eval_subset, load_split

    tokenizer = load_tokenizer(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        val = load_split(args.val, scratch, vocab_size=model.config.vocab_size,
                         max_positions=model.config.max_position_embeddings)
        for cap in args.rows:
            r = {"eval_rows": cap, **time_pass(model, tokenizer, eval_subset(val, cap),
                                               args.batch_size, scratch)}
            results.append(r)
            print(f"eval_rows {cap:>4}: {r['rows']} rows, {r['tokens']} tokens "
                  f"({r['padded_tokens']} padded), loss {r['eval_loss']:.4f}: {r['wall_s']} s "
                  f"wall, {r['cpu_s']} s CPU (load {r['load_avg_1min_before']})", flush=True)
    full = next((r for r in results if r["eval_rows"] == 0), None)
    for r in results:
        if full is not None:
            r["cpu_s_vs_full"] = round(r["cpu_s"] / full["cpu_s"], 3)
    out = {"command": "python " + shlex.join(["bench/val_pass.py", *sys.argv[1:]]),
           "model": str(args.base), "model_type": model.config.model_type,
           "parameters": sum(p.numel() for p in model.parameters()),
           "val": str(args.val), "cpu": cpu_name(), "cpus": os.cpu_count(),
           "batch_size": args.batch_size, "results": results}
    print(out["command"])
    for r in results:
        print(f"  eval_rows {r['eval_rows']}: {r['cpu_s']} CPU s"
              + (f" = {r['cpu_s_vs_full']:.2f} x the whole split" if full else ""))
    if args.out:
        io.write_json(args.out, out)


if __name__ == "__main__":
    main()

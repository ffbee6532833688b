"""Benchmark the evaluate stage on CPU: wall time of generation + every metric for N test rows.

Builds the embedded default base (tiny Qwen3, tokenizer trained on the demo text) from the
seeded demo data, formats ``--rows`` demo conversations and runs
:func:`reprotune.evaluate.evaluation.evaluate_model` with the default ``eval`` params (batched greedy
decoding, left padding, BLEU/chrF/ROUGE/F1/classification/perplexity). The untrained base
ends many answers at once (empty predictions), so ``--model models/finetuned`` (after
``dvc repro``) times the fine-tuned model, which answers every row, instead.

    .venv/bin/python bench/eval_speed.py --rows 1000 --model models/finetuned \
        --out bench/results/eval_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprotune import io  # noqa: E402
from reprotune.data.demo import generate_demo  # noqa: E402
from reprotune.data.formatting import format_records  # noqa: E402
from reprotune.data.inputs import ingest_files  # noqa: E402
from reprotune.evaluate.evaluation import evaluate_model  # noqa: E402
from reprotune.modeling import create_tiny_base, load_model, load_tokenizer  # noqa: E402
from reprotune.params import EvalParams, TinyModelParams, as_dict  # noqa: E402
from reprotune.train.loading import load_finetuned  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--model", default=None, help="a train-stage output dir to evaluate "
                    "instead of a fresh untrained base")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "demo.jsonl"
        # generate extra rows: the demo plants malformed lines and duplicates
        raw.write_text("\n".join(generate_demo(int(args.rows * 1.3) + 50, 0)) + "\n",
                       encoding="utf-8")
        records = ingest_files([str(raw)]).records[: args.rows]
        texts = [m.get("content") or "" for r in records for m in r["messages"]]
        if args.model:
            model, tok, _ = load_finetuned(args.model, dtype=torch.float32, device="cpu")
        else:
            base = Path(tmp) / "base"
            create_tiny_base(base, texts, TinyModelParams(), seed=0)
            tok, model = load_tokenizer(base), load_model(base, dtype=torch.float32)
        model.eval()
        rows, _, _ = format_records(records, tok, max_length="auto", enable_thinking=False)
        cfg = EvalParams()
        t0 = time.perf_counter()
        metrics, _ = evaluate_model(model, tok, rows, cfg, enable_thinking=False, seed=0,
                                    source="demo")
        wall = time.perf_counter() - t0
    figures = {"model": args.model or "untrained tiny base", "rows": metrics["n_rows"], "eval_wall_s": round(wall, 1),
               "rows_per_s": round(metrics["n_rows"] / wall, 1),
               "empty_predictions": metrics["n_empty_predictions"],
               "bleu": metrics["bleu"], "f1": metrics["f1"],
               "torch_threads": torch.get_num_threads()}
    command = "python bench/eval_speed.py " + " ".join(sys.argv[1:])
    for k, v in figures.items():
        print(f"{k:20s} {v}")
    print(f"command: {command}")
    if args.out:
        io.write_json(args.out, {
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), {platform.system()}",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "command": command, "eval_params": as_dict(cfg), "figures": figures})


if __name__ == "__main__":
    main()

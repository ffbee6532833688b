"""DVC stage `quantize`: torchao INT8 / bitsandbytes / GGUF / ONNX Runtime artifacts of the
merged model, each measured in a fresh process (size, compression, CPU tokens/s, perplexity,
main metric)."""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime, scorecard, verify
from reprotune.deploy.quant_common import TemplateMismatch
from reprotune.deploy.quant_measure import set_threads
from reprotune.deploy.quant_report import report_markdown
from reprotune.deploy.quantize import quantize_all
from reprotune.evaluate.metrics import NonFiniteLossError
from reprotune.params import as_dict, load_section, load_top
from reprotune.timing import split_timing, write_timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merged", default="models/merged")
    ap.add_argument("--test", default="data/processed/test.parquet")
    ap.add_argument("--out", default="models/quantized")
    ap.add_argument("--metrics", default="metrics/quantize.json")
    ap.add_argument("--report", default="reports/quantize.md")
    args = ap.parse_args()

    log = runtime.setup("quantize")
    verify.check_stage_input(args.merged, log)  # dvc status misses a changed byte
    cfg = load_section("quantize")
    top = load_top()
    runtime.seed_everything(top.seed)
    threads = set_threads()  # once; each measuring process does the same for itself
    log.info("torch / onnxruntime threads: %d (usable cores)", threads)
    io.clean_stale_temporaries(args.out, args.metrics, args.report)

    def write(metrics: dict, details: dict) -> None:
        # speed varies run to run: tracked files get only the reproducible numbers
        metrics, timing = split_timing(metrics)
        write_timing("quantize", timing)
        io.write_json(args.metrics, metrics)
        scorecard.write(args.metrics, metrics)
        with io.atomic_path(args.report) as tmp:
            tmp.write_text(report_markdown(metrics, details, cfg.methods), encoding="utf-8")

    try:
        metrics, details = quantize_all(
            args.merged, args.test, args.out, methods=cfg.methods, keep=cfg.keep_full_precision,
            eval_params=as_dict(load_section("eval")), eval_rows=cfg.eval_rows,
            enable_thinking=load_section("format").enable_thinking, seed=top.seed)
    except TemplateMismatch as exc:
        if exc.results is not None:  # measured, but some artifact formats prompts differently
            write(*exc.results)
        log.error("%s", exc)
        sys.exit(1)
    except RuntimeError as exc:
        if NonFiniteLossError.__name__ in str(exc):  # raised in the measuring subprocess
            sys.exit(f"quantize: {args.merged} or an artifact built from it gives non-finite "
                     f"losses: corrupt weights? Restore them from the DVC cache with `dvc "
                     f"checkout --relink --force {args.merged}` or rebuild with `dvc repro -f "
                     f"merge`. {str(exc).splitlines()[0]}")
        raise
    write(metrics, details)
    log.info("wrote %s and %s", args.metrics, args.report)


if __name__ == "__main__":
    main()

"""DVC stage `format`: render each split with the chat template, mask every assistant turn, truncate.

It runs after split, on train/val/test separately: ``format.max_length: auto`` comes from the
train split's lengths and applies to all three. Rows go through Hugging Face `datasets`
(Arrow on disk, a batched map over `data.num_proc` processes) and are written in bounded
Parquet row groups: no stage-wide Python rows (reprotune.data.format_stream).

With a mixture (``ingest.mixture.tasks``) each row keeps its ``task`` as a column, and the
train split is resampled to the task weights before rendering (``strategy: interleave``,
reprotune.data.mixture); metrics/format.json counts rows per task under ``mixture``.

With ``format.mode: text`` (continued pretraining) the splits hold text documents instead:
no template, EOS after each document, packed into rows of ``format.max_length`` tokens, every
token labelled (reprotune.data.text_packing); the pair files are written empty.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from reprotune import io, runtime, scorecard
from reprotune.chat_template import template_fingerprint
from reprotune.data import SPLITS, mixture
from reprotune.data.format_stream import format_splits, write_parquet
from reprotune.data.formatting import FormatError, combine_stats, formatted_schema
from reprotune.data.pairs import combine as combine_pairs
from reprotune.data.pairs import (
    combine_unpaired,
    emptied_splits,
    format_pairs,
    format_unpaired,
    pair_records,
    unpaired_records,
)
from reprotune.data.text_packing import Packer, count_documents, tables, text_max_length
from reprotune.data.text_packing import combine as combine_text
from reprotune.modeling import BASE_INFO_FILE, context_length, load_tokenizer
from reprotune.params import load_section
from reprotune.plots import histogram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default="data/interim/splits", help="train/val/test.jsonl")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--out-dir", default="data/processed", help="train/val/test.parquet")
    ap.add_argument("--dropped", default="data/interim/format_dropped.jsonl")
    ap.add_argument("--metrics", default="metrics/format.json")
    ap.add_argument("--plot", default="metrics/plots/token_lengths.png")
    ap.add_argument("--pairs-dir", default="data/processed/pairs",
                    help="preference pairs per split (<split>.jsonl), unpaired KTO rows "
                         "(unpaired_<split>.jsonl) and dropped.jsonl")
    args = ap.parse_args()

    log = runtime.setup("format")
    cfg = load_section("format")
    num_proc = runtime.data_processes(load_section("data"))
    datas = {s: Path(args.data_dir) / f"{s}.jsonl" for s in SPLITS}
    outs = {s: Path(args.out_dir) / f"{s}.parquet" for s in SPLITS}
    pairs = {s: Path(args.pairs_dir) / f"{s}.jsonl" for s in SPLITS}
    unpaired = {s: Path(args.pairs_dir) / f"unpaired_{s}.jsonl" for s in SPLITS}
    pairs_dropped = Path(args.pairs_dir) / "dropped.jsonl"
    io.clean_stale_temporaries(*outs.values(), args.dropped, args.metrics, args.plot,
                               *pairs.values(), *unpaired.values(), pairs_dropped)
    tokenizer = load_tokenizer(args.base)
    base_info = io.read_json(Path(args.base) / BASE_INFO_FILE)
    sha = template_fingerprint(tokenizer.chat_template or "")
    if sha != base_info["chat_template_sha256"]:
        raise SystemExit(f"{args.base}: tokenizer chat template {sha[:12]} differs from the one "
                         f"recorded in {BASE_INFO_FILE} ({base_info['chat_template_sha256'][:12]}); "
                         f"rerun the base stage")
    if cfg.mode == "text":
        _format_text(args, cfg, tokenizer, datas, outs, pairs, pairs_dropped, sha)
        return
    Path(outs["train"]).parent.mkdir(parents=True, exist_ok=True)
    documents = {s: n for s in SPLITS if (n := count_documents(datas[s]))}
    if documents:  # a document through the chat template would train as an assistant answer
        raise SystemExit(f"format: format.mode: chat, but the splits hold text documents "
                         f"({documents}; {{\"text\": ...}} rows or .txt inputs); set "
                         f"format.mode: text to continue pretraining on them, or remove those "
                         f"inputs (DAPT then SFT: two experiments, docs/training.md)")
    try:
        # a mixture (ingest.mixture): the train rows resampled to the task weights, in a
        # scratch file beside the outputs; val, test and the preference pairs stay natural
        with tempfile.TemporaryDirectory(prefix=".train.mixed.", suffix=".tmp",
                                         dir=outs["train"].parent) as scratch:
            rendered, mix = mixture.mix_train(datas, load_section("ingest").mixture, scratch)
            plans = format_splits(
                rendered, tokenizer, outs=outs, dropped=args.dropped, max_length=cfg.max_length,
                enable_thinking=cfg.enable_thinking, model_limit=context_length(args.base),
                warn_truncated=cfg.warn_truncated, num_proc=num_proc,
                progress=sys.stderr.isatty(), train_reasoning=cfg.train_reasoning,
                tasks=mix is not None)
    except (FormatError, mixture.MixtureError) as exc:
        raise SystemExit(f"format: {exc}") from None
    lengths = np.concatenate([p.lengths for p in plans.values()])
    stats = combine_stats({s: p.stats for s, p in plans.items()}, lengths, limit_from="train",
                          warn_truncated=cfg.warn_truncated)
    histogram(lengths, args.plot, title="Tokens per conversation, all splits (before truncation)",
              xlabel="tokens", vline=stats["max_length"])
    stats["chat_template_sha256"] = sha
    if mix is not None:  # rows per task: sampled train, natural val/test, and after formatting
        stats["mixture"] = {**mix, "rows_out": {s: mixture.parquet_tasks(outs[s]) for s in SPLITS}}
    # preference pairs, cut to the same limit: dropped when too long, never truncated
    pair_stats, pair_drops = {}, []
    for name in SPLITS:
        rows, pair_stats[name], drops = format_pairs(
            pair_records(datas[name]), tokenizer, max_length=stats["max_length"],
            enable_thinking=cfg.enable_thinking)
        io.write_jsonl(pairs[name], rows)
        pair_drops += [{**d, "split": name} for d in drops]
    unpaired_stats = {}
    for name in SPLITS:  # unpaired KTO rows (empty files when the data has none)
        rows, unpaired_stats[name], drops = format_unpaired(
            unpaired_records(datas[name]), tokenizer, max_length=stats["max_length"],
            enable_thinking=cfg.enable_thinking)
        io.write_jsonl(unpaired[name], rows)
        pair_drops += [{**d, "split": name} for d in drops]
    io.write_jsonl(pairs_dropped, pair_drops)
    if any(s["rows_in"] for s in unpaired_stats.values()):
        stats["unpaired"] = combine_unpaired(unpaired_stats)
        log.info("unpaired KTO rows: %d of %d kept (%d desirable, %d undesirable)",
                 stats["unpaired"]["rows_out"], stats["unpaired"]["rows_in"],
                 stats["unpaired"]["desirable"], stats["unpaired"]["undesirable"])
    if any(s["pairs_in"] for s in pair_stats.values()):  # data without pairs: format.json as before
        stats["preference"] = combine_pairs(pair_stats)
        log.info("preference pairs: %d of %d kept, dropped %s", stats["preference"]["pairs_out"],
                 stats["preference"]["pairs_in"], stats["preference"]["dropped"])
        for warning in emptied_splits(pair_stats):  # an empty file not explained by the data
            log.warning("%s (%s)", warning, pairs_dropped)
    else:
        log.info("no preference pairs in the data (no row has a chosen and a rejected answer): "
                 "%s/<split>.jsonl are empty", args.pairs_dir)
    io.write_json(args.metrics, stats)
    scorecard.write(args.metrics, stats)
    log.info("formatted %d/%d rows at max_length %d (%s): %d truncated (%.1f%%), dropped %s, "
             "%d label tokens", stats["rows_out"], stats["rows_in"], stats["max_length"],
             cfg.max_length, stats["truncated"], 100 * stats["truncated_share"],
             {k: v for k, v in stats["dropped"].items() if v}, stats["label_tokens"])
    io.note_empty(args.dropped, "no row was dropped")
    if stats["truncation_warning"]:
        log.warning("SUMMARY: %.1f%% of rows truncated (more than format.warn_truncated=%g)",
                    100 * stats["truncated_share"], cfg.warn_truncated)


def _format_text(args: argparse.Namespace, cfg: Any, tokenizer: Any, datas: dict[str, Path],
                 outs: dict[str, Path], pairs: dict[str, Path], pairs_dropped: Path,
                 sha: str) -> None:
    """``format.mode: text``: each split's documents packed (reprotune.data.text_packing)."""
    log = logging.getLogger("format")
    model_limit = context_length(args.base)
    limit = text_max_length(cfg.max_length, model_limit)
    packers, drops = {}, []
    try:
        for name in SPLITS:
            packers[name] = Packer(tokenizer, limit)
            write_parquet(outs[name], tables(packers[name].rows(io.iter_jsonl(datas[name]))),
                          formatted_schema())
            drops += [{**d, "split": name} for d in packers[name].dropped]
    except FormatError as exc:
        raise SystemExit(f"format: {exc}") from None
    if not packers["train"].stats["rows_out"]:
        raise SystemExit(f"format: {datas['train']}: no train rows left after packing: "
                         f"{packers['train'].stats['dropped']}")
    io.write_jsonl(args.dropped, drops)
    for path in (*pairs.values(), pairs_dropped):  # no conversations, no preference pairs
        io.write_jsonl(path, [])
    lengths = np.concatenate([np.asarray(p.lengths, dtype=np.int64) for p in packers.values()])
    stats = combine_text({s: p.summary() for s, p in packers.items()}, lengths,
                         setting=cfg.max_length, model_limit=model_limit)
    stats["chat_template_sha256"] = sha
    histogram(lengths, args.plot, title="Tokens per document, all splits (before packing)",
              xlabel="tokens", vline=stats["max_length"])
    io.write_json(args.metrics, stats)
    log.info("packed %d of %d documents into %d rows of at most %d tokens (%s): %d tokens, "
             "all labelled; dropped %s", stats["documents_packed"], stats["documents_in"],
             stats["rows_out"], stats["max_length"], cfg.max_length, stats["tokens_out"],
             {k: v for k, v in stats["dropped"].items() if v})
    io.note_empty(args.dropped, "no document was dropped")


if __name__ == "__main__":
    main()

"""DVC stage `format`: render with the chat template, mask every assistant turn, truncate."""

from __future__ import annotations

import argparse
from pathlib import Path

from reprotune import io, runtime
from reprotune.chat_template import template_fingerprint
from reprotune.formatting import format_records, formatted_schema
from reprotune.modeling import BASE_INFO_FILE, load_tokenizer
from reprotune.params import load_section
from reprotune.plots import histogram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/interim/deduped.jsonl")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--out", default="data/processed/formatted.parquet")
    ap.add_argument("--metrics", default="metrics/format.json")
    ap.add_argument("--plot", default="metrics/plots/token_lengths.png")
    args = ap.parse_args()

    log = runtime.setup("format")
    cfg = load_section("format")
    records = io.read_jsonl(args.data)
    tokenizer = load_tokenizer(args.base)
    base_info = io.read_json(Path(args.base) / BASE_INFO_FILE)
    sha = template_fingerprint(tokenizer.chat_template or "")
    if sha != base_info["chat_template_sha256"]:
        raise SystemExit(f"{args.base}: tokenizer chat template {sha[:12]} differs from the one "
                         f"recorded in {BASE_INFO_FILE} ({base_info['chat_template_sha256'][:12]}); "
                         f"rerun the base stage")
    rows, stats = format_records(records, tokenizer, max_length=cfg.max_length,
                                 enable_thinking=cfg.enable_thinking)
    if not rows:
        raise SystemExit(f"{args.data}: no rows left after formatting: {stats['dropped']}")
    io.write_parquet(args.out, rows, schema=formatted_schema())
    lengths = stats.pop("lengths")
    histogram(lengths, args.plot, title="Tokens per conversation (before truncation)",
              xlabel="tokens", vline=cfg.max_length)
    stats["chat_template_sha256"] = sha
    io.write_json(args.metrics, stats)
    log.info("formatted %d/%d rows (%d truncated, dropped %s), %d label tokens",
             stats["rows_out"], stats["rows_in"], stats["truncated"], stats["dropped"],
             stats["label_tokens"])


if __name__ == "__main__":
    main()

"""DVC stage `base`: write the base model dir (embedded tiny Qwen3, or a real local/cached model).

The embedded model's tokenizer is trained on the train split only (the split stage runs
first), so no val/test text shapes its vocabulary.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from reprotune import io, runtime
from reprotune.lineage import run_info, write_run_info
from reprotune.modeling import prepare_base
from reprotune.params import as_dict, load_section


def corpus(records: Iterable[dict]) -> list[str]:
    """Tokenizer training text: every message's content, tool calls and tool schemas."""
    texts: list[str] = []
    for rec in records:
        for m in rec["messages"]:
            texts.append(m.get("content") or "")
            if m.get("tool_calls"):
                texts.append(json.dumps(m["tool_calls"], ensure_ascii=False))
        if rec.get("tools"):
            texts.append(json.dumps(rec["tools"], ensure_ascii=False))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/interim/splits/train.jsonl")
    ap.add_argument("--out", default="models/base")
    ap.add_argument("--metrics", default="metrics/base.json")
    args = ap.parse_args()

    log = runtime.setup("base")
    cfg = load_section("model")
    io.clean_stale_temporaries(args.out, args.metrics)
    # the corpus only matters for the embedded model; a real model brings its own tokenizer
    texts = corpus(io.iter_jsonl(args.data)) if cfg.name == "tiny" else []
    info = prepare_base(cfg.name, Path(args.out), texts, cfg.tiny, cfg.seed,
                        trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file)
    # the libraries that write these bytes (the tiny base is built on the CPU everywhere)
    write_run_info(args.out, run_info("base", {"model": as_dict(cfg)},
                                      [args.data] if cfg.name == "tiny" else [], "cpu",
                                      packages=("reprotune", "torch", "transformers",
                                                "tokenizers", "safetensors")))
    io.write_json(args.metrics, info)
    log.info("base model %s (%s): vocab %d, %d parameters", info["name"], info["source"],
             info["vocab_size"], info["n_params"])


if __name__ == "__main__":
    main()

"""DVC stage `merge`: fold a LoRA/DoRA adapter into the base weights (plain transformers model).

Full/freeze fine-tunes pass through unchanged; prompt/prefix-tuning adapters cannot be
merged, so the base is written with the soft prompt kept in ``soft_prompt/`` (said in the
log and in the metrics). `--finetuned` may be the align stage's folder: a pass-through
(align.method: none) points at the SFT folder, which is merged instead.
"""

from __future__ import annotations

import argparse

from reprotune import io, runtime, scorecard, verify
from reprotune.deploy.merge import directory_size, merge_finetuned
from reprotune.train.loading import FinetunedLoadError, resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--finetuned", default="models/finetuned")
    ap.add_argument("--out", default="models/merged")
    ap.add_argument("--metrics", default="metrics/merge.json")
    args = ap.parse_args()

    log = runtime.setup("merge")
    verify.check_stage_input(args.finetuned, log)  # dvc status misses a changed byte
    io.clean_stale_temporaries(args.out, args.metrics)
    try:
        folder = resolve_model_dir(args.finetuned)
    except FinetunedLoadError as exc:
        raise SystemExit(f"merge: {exc}") from None
    if str(folder) != args.finetuned:
        verify.check_stage_input(str(folder), log)  # the SFT folder align's pointer names
    try:
        info = merge_finetuned(folder, args.out)
    except FinetunedLoadError as exc:  # e.g. pickled weights only: never unpickled
        raise SystemExit(f"merge: {exc}") from None
    metrics = {k: info[k] for k in ("method", "kind", "merged", "reason", "enable_thinking",
                                    "chat_template_sha256", "max_abs_logit_diff",
                                    "soft_prompt_dir")}
    metrics["size_mb"] = round(directory_size(args.out) / 2**20, 4)
    io.write_json(args.metrics, metrics)
    scorecard.write(args.metrics, metrics)
    if not info["merged"]:
        log.warning("NOT merged: %s", info["reason"])
    log.info("merge output %s: %.3f MiB", args.out, metrics["size_mb"])


if __name__ == "__main__":
    main()

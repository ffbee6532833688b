"""DVC stage `ref_logps`: the reference model's log-probs on format's pairs, computed once.

align (dpo, kto on a full fine-tune with align.precompute_ref) reads them instead of
recomputing them every run, so a sweep over align.beta, loss_type or lr reuses them; the
stage depends only on what shapes them: the SFT model, the pair files, align.method,
align.batch_size, align.precompute_ref and seed (reprotune.train.ref_logps). Any other
method writes only data/processed/ref_logps/info.json saying nothing was computed.
"""

from __future__ import annotations

import argparse

from reprotune import io, runtime
from reprotune.data.preference import PairsError, check_pairs
from reprotune.params import AlignParams, load_section, load_top
from reprotune.train.align import read_pairs, reference_trainer, unpaired_path
from reprotune.train.align_methods import precomputes_ref
from reprotune.train.loading import FinetunedLoadError, read_manifest
from reprotune.train.methods import TrainSetupError
from reprotune.train.ref_logps import skipped, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", default="data/processed/pairs/train.jsonl")
    ap.add_argument("--val", default="data/processed/pairs/val.jsonl")
    ap.add_argument("--finetuned", default="models/finetuned")
    ap.add_argument("--out", default="data/processed/ref_logps")
    args = ap.parse_args()

    log = runtime.setup("ref_logps")
    align = load_section("align")
    # only the keys that shape the log-probs (dvc.yaml lists exactly these): a change of
    # beta, loss_type or lr leaves this stage cached
    cfg = AlignParams(method=align.method, batch_size=align.batch_size,
                      precompute_ref=align.precompute_ref)
    io.clean_stale_temporaries(args.out)
    seed = load_top().seed
    try:
        kind = read_manifest(args.finetuned)["kind"] if cfg.method != "none" else None
        if kind is None or not precomputes_ref(cfg, kind):
            info = skipped(args.out, cfg, kind)
        else:  # refused here as align would: TRL's own error would be obscure
            check_pairs(cfg.method, 0, len(read_pairs(args.train)), None, args.train,
                        len(read_pairs(unpaired_path(args.train))) if cfg.method == "kto" else 0)
            trainer, fingerprint, device, precision = reference_trainer(
                train_pairs=args.train, val_pairs=args.val, finetuned=args.finetuned, cfg=cfg,
                seed=seed)
            info = write(args.out, trainer, cfg, fingerprint, device, precision, seed)
    except (PairsError, TrainSetupError, FinetunedLoadError) as exc:
        raise SystemExit(f"ref_logps: {exc}") from None
    if info["computed"]:
        log.info("reference log-probs of %s: %s rows on %s (%s) in %s", cfg.method, info["rows"],
                 info["device"], info["precision"], args.out)
    else:
        log.info("no reference log-probs to cache (%s): %s", info["why"], args.out)


if __name__ == "__main__":
    main()

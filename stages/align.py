"""DVC stage `align`: preference tuning of the SFT model (align.method), or a free pass-through.

`align.method: none` writes only a pointer to models/finetuned (evaluate and merge follow
it); `dpo`, `orpo`, `simpo` and `kto` run that TRL trainer on format's train/val pairs
(reprotune.train.align, reprotune.train.align_methods); `kto` also on the unpaired rows
(data/processed/pairs/unpaired_<split>.jsonl).
"""

from __future__ import annotations

import argparse

from reprotune import io, runtime, scorecard
from reprotune.data.preference import PairsError, check_pairs, check_unpaired
from reprotune.lineage import run_info, write_run_info
from reprotune.params import as_dict, load_section, load_top
from reprotune.timing import split_timing, write_timing
from reprotune.train.align import align_model, pass_through, read_pairs, unpaired_path
from reprotune.train.loading import FinetunedLoadError
from reprotune.train.methods import TrainSetupError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", default="data/processed/pairs/train.jsonl")
    ap.add_argument("--val", default="data/processed/pairs/val.jsonl")
    ap.add_argument("--finetuned", default="models/finetuned")
    ap.add_argument("--out", default="models/aligned")
    ap.add_argument("--checkpoints", default="models/align_checkpoints")
    ap.add_argument("--live-dir", default="metrics/align_curves")
    ap.add_argument("--metrics", default="metrics/align.json")
    ap.add_argument("--ref-logps", default="data/processed/ref_logps",
                    help="the ref_logps stage's reference log-probs (used when they match)")
    args = ap.parse_args()

    log = runtime.setup("align")
    cfg = load_section("align")
    io.clean_stale_temporaries(args.out, args.metrics)
    n_train, n_val = len(read_pairs(args.train)), len(read_pairs(args.val))
    unpaired = [read_pairs(unpaired_path(p)) for p in (args.train, args.val)]
    try:
        # unpaired KTO rows with another method: the check stage refuses once it sees the
        # split; the first run after an input change is refused here
        check_unpaired(cfg.method, {"desirable": sum(r["label"] for r in unpaired[0]),
                                    "undesirable": sum(not r["label"] for r in unpaired[0])},
                       str(unpaired_path(args.train)))
        check_pairs(cfg.method, cfg.patience, n_train, n_val, args.train,
                    len(unpaired[0]), len(unpaired[1]))
        if cfg.method == "none":
            info = pass_through(args.finetuned, args.out, args.live_dir)
            record = {**info, "train_pairs": n_train, "val_pairs": n_val}
            io.write_json(args.metrics, record)
            scorecard.write(args.metrics, record)
            log.info("align.method none: %s passes through (%d train pairs unused)",
                     args.finetuned, n_train)
            return
        seed = load_top().seed
        metrics = align_model(train_pairs=args.train, val_pairs=args.val,
                              finetuned=args.finetuned, out_dir=args.out,
                              checkpoints_dir=args.checkpoints, live_dir=args.live_dir, cfg=cfg,
                              seed=seed, qlora=load_section("qlora"), ref_logps=args.ref_logps)
    except (PairsError, TrainSetupError, FinetunedLoadError) as exc:
        raise SystemExit(f"align: {exc}") from None
    write_run_info(args.out, run_info("align", {"align": as_dict(cfg), "seed": seed},
                                      [args.train, args.val, args.finetuned,
                                       *([args.ref_logps] if metrics["ref_logps_cached"] else [])],
                                      metrics["device"]))
    metrics, timing = split_timing(metrics)
    write_timing("align", timing)
    io.write_json(args.metrics, metrics)
    scorecard.write(args.metrics, metrics)
    if not metrics["val_evaluated"]:
        log.info("align %s (%s): %d steps on %d train pairs; no val pairs, so no val evaluation "
                 "(the last step's weights are kept)", cfg.method, "+".join(metrics["loss_type"]),
                 metrics["train_steps"], metrics["train_pairs"])
        return
    val = metrics["final_val"]
    log.info("align %s (%s): val loss %s -> %s in %d steps; val reward margin %s%s",
             cfg.method, "+".join(metrics["loss_type"]), metrics["initial_val_loss"],
             metrics["best_val_loss"], metrics["train_steps"], val.get("rewards/margins"),
             # KTO scores answers one by one: it logs no pair accuracy
             f", accuracy {acc['correct']}/{acc['total']} pairs ({acc['ratio']})"
             if (acc := metrics.get("val_accuracy")) else "")


if __name__ == "__main__":
    main()

"""DVC stage `train`: fine-tune the base model with the method chosen by the `method` param.

With `train.launcher: accelerate` this script starts `train.num_processes` copies of itself
under `accelerate launch` (reprotune.train.launch) and waits; only rank 0 writes outputs.
"""

from __future__ import annotations

import argparse
import sys

from reprotune import io, runtime, scorecard
from reprotune.cpu_kernels import use_native_kernels
from reprotune.lineage import run_info, write_run_info
from reprotune.params import load_section, load_top
from reprotune.timing import split_timing, write_timing
from reprotune.train import distributed, launch
from reprotune.train.methods import TrainSetupError
from reprotune.train.packing import PACKS, resolve_packing
from reprotune.train.training import RunConfig, train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", default="data/processed/train.parquet")
    ap.add_argument("--val", default="data/processed/val.parquet")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--out", default="models/finetuned")
    ap.add_argument("--checkpoints", default="models/checkpoints")
    ap.add_argument("--live-dir", default="metrics/train")
    ap.add_argument("--metrics", default="metrics/train.json")
    args = ap.parse_args()

    log = runtime.setup("train")
    cfg = RunConfig(top=load_top(), train=load_section("train"), lora=load_section("lora"),
                    qlora=load_section("qlora"), freeze=load_section("freeze"),
                    prompt=load_section("prompt"),
                    enable_thinking=load_section("format").enable_thinking)
    if cfg.train.launcher == "accelerate" and not launch.inside_launch():
        try:  # every check that can fail runs before any process starts
            cuda = launch.available_devices()[1].startswith("CUDA")
            packing = resolve_packing(cfg.train.packing, "cuda" if cuda else "cpu",
                                      cfg.top.method)[0] == PACKS
            plan = launch.preflight(cfg.train, batch_size=cfg.top.batch_size,
                                    method=cfg.top.method, packing=packing, base_dir=args.base)
            launch.relaunch(plan, __file__, sys.argv[1:])
        except TrainSetupError as exc:
            raise SystemExit(f"train: {exc}") from None
        return
    if cfg.train.mode == "fast":  # speed over cross-machine bytes: the CPU's own kernels
        use_native_kernels()     # (before the first torch op; lineage records which ran)
    runtime.seed_everything(cfg.top.seed)
    if distributed.is_main():
        io.clean_stale_temporaries(args.out, args.metrics)
    try:
        metrics = train_model(train_path=args.train, val_path=args.val, base_dir=args.base,
                              out_dir=args.out, checkpoints_dir=args.checkpoints,
                              live_dir=args.live_dir, cfg=cfg)
    except TrainSetupError as exc:  # bad input: one clear line, no traceback
        raise SystemExit(f"train: {exc}") from None
    if not distributed.is_main():  # rank 0 writes the lineage, timing and metrics
        distributed.finish()
        return
    # which params, inputs, versions and device made this model; travels with the folder
    write_run_info(args.out, run_info("train", cfg.relevant(), [args.train, args.val, args.base],
                                      metrics["device"]))
    metrics, timing = split_timing(metrics)  # speed and memory vary run to run: untracked
    write_timing("train", timing)
    io.write_json(args.metrics, metrics)
    scorecard.write(args.metrics, metrics)
    distributed.finish()
    log.info("%s: val loss %s -> %s (%d steps, %.0f s in all, %s tokens/s over the training "
             "steps; mode %s, %s, packing %s, attention %s, loss %s)", metrics["method"],
             metrics["initial_val_loss"], metrics["best_val_loss"], metrics["train_steps"],
             timing.get("wall_time_s", 0), timing.get("tokens_per_s"), metrics["mode"],
             metrics["precision"], metrics["packing_style"], metrics["attention"],
             metrics["loss_impl"])


if __name__ == "__main__":
    main()

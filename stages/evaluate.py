"""DVC stages `eval_base` and `evaluate`: score a model on the test split.

`--kind base` evaluates the base model dir; `--kind finetuned` evaluates the training
output (adapter or full model) and, given `--base-metrics`, writes fine-tuned values, base
values and the gain side by side, plus the Markdown report and the confusion-matrix plot.
`--model` may be the align stage's folder (a pass-through points at the SFT folder); with
`--pairs` and `--reference` (the SFT folder) the test pairs' preference metrics are added.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reprotune import io, launcher, runtime, scorecard, verify
from reprotune.chat_template import template_fingerprint
from reprotune.evaluate import tasks
from reprotune.evaluate.comparison import compare, is_finite_metrics, metrics_file
from reprotune.evaluate.evaluation import EvalDataError, evaluate_model, load_test_rows
from reprotune.evaluate.forgetting import (
    GeneralTextError,
    compare_general,
    load_general_text,
    score_general_text,
)
from reprotune.evaluate.forgetting import report_section as forgetting_section
from reprotune.evaluate.metrics import NonFiniteLossError
from reprotune.evaluate.paired import compare_records, intervals_file
from reprotune.evaluate.preference import gain as preference_gain
from reprotune.evaluate.preference import preference_metrics, report_section
from reprotune.evaluate.report import plot_confusion, relative_link, render_report, write_report
from reprotune.evaluate.text_eval import evaluate_text, is_packed_text
from reprotune.modeling import BASE_INFO_FILE, load_model, load_tokenizer
from reprotune.params import load_section
from reprotune.train import distributed
from reprotune.train.loading import FinetunedLoadError, resolve_model_dir

DEFAULTS = {
    "base": {"model": "models/base", "metrics": "metrics/eval_base.json",
             "predictions": "data/eval/predictions_base.jsonl",
             "general": "data/eval/general_base.jsonl"},
    "finetuned": {"model": "models/finetuned", "metrics": "metrics/eval.json",
                  "predictions": "data/eval/predictions.jsonl",
                  "general": "data/eval/general.jsonl"},
}


def _load(kind: str, model_dir: str, thinking_param: bool, log: Any) -> tuple[Any, Any, bool, dict]:
    """(model, tokenizer, enable_thinking, info) for a base or fine-tuned model dir.

    Both kinds run in the same precision (bf16 on a bf16-capable GPU, else fp32) so the
    base-vs-fine-tuned gain is not a precision artefact.
    """
    import torch

    device = distributed.local_device()  # cuda:<local rank> when several processes share GPUs
    dtype = (torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported()
             else torch.float32)
    if kind == "base":
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, dtype=dtype).to(device).eval()
        info_path = Path(model_dir) / BASE_INFO_FILE
        info = io.read_json(info_path) if info_path.exists() else {}
        enable_thinking = thinking_param
    else:
        from reprotune.train.loading import load_finetuned

        model, tokenizer, info = load_finetuned(model_dir, dtype=dtype, device=device)
        # render prompts the way the model was trained, whatever params.yaml says now
        enable_thinking = bool(info.get("enable_thinking", thinking_param))
        if enable_thinking != thinking_param:
            log.warning("format.enable_thinking=%s but %s was trained with %s: using the latter",
                        thinking_param, model_dir, enable_thinking)
    sha = template_fingerprint(tokenizer.chat_template or "")
    if info.get("chat_template_sha256") and info["chat_template_sha256"] != sha:
        log.warning("%s: tokenizer chat template %s differs from the recorded %s: prompts may "
                    "not match training", model_dir, sha[:12], info["chat_template_sha256"][:12])
    return model, tokenizer, enable_thinking, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kind", choices=sorted(DEFAULTS), default="finetuned")
    ap.add_argument("--model", help="model dir (default: models/base | models/finetuned)")
    ap.add_argument("--test", default="data/processed/test.parquet")
    ap.add_argument("--metrics", help="default: metrics/eval_base.json | metrics/eval.json")
    ap.add_argument("--predictions",
                    help="default: data/eval/predictions_base.jsonl | data/eval/predictions.jsonl")
    ap.add_argument("--base-metrics", help="eval_base metrics to compare with (finetuned)")
    ap.add_argument("--gain", help="where to write the fine-tuned minus base gains (finetuned)")
    ap.add_argument("--base-predictions", help="base predictions shown beside the examples")
    ap.add_argument("--general", help="where to write the per-row general-text NLLs (the "
                                      "forgetting check; default data/eval/general[_base].jsonl)")
    ap.add_argument("--base-general", help="eval_base's general-text NLLs to compare with")
    ap.add_argument("--report", help="Markdown report to write, e.g. reports/eval.md")
    ap.add_argument("--confusion", help="confusion-matrix PNG to write")
    ap.add_argument("--pairs", help="test preference pairs (format's pairs/test.jsonl)")
    ap.add_argument("--reference", help="the SFT folder the pairs' rewards are relative to")
    ap.add_argument("--seed", type=int, default=0,
                    help="sampling seed (used only with eval.do_sample)")
    args = ap.parse_args()
    for key, value in DEFAULTS[args.kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    log = runtime.setup("evaluate")
    if not launcher.inside_launch():  # once, not in every rank
        verify.check_stage_input(args.model, log)  # a changed byte would be scored silently
    if args.kind == "finetuned":  # align's pass-through holds no weights: follow it
        try:
            folder = str(resolve_model_dir(args.model))
        except FinetunedLoadError as exc:
            raise SystemExit(f"evaluate: {exc}") from None
        if folder != args.model and not launcher.inside_launch():
            verify.check_stage_input(folder, log)  # the SFT folder the pointer names
        args.model = folder
    cfg = load_section("eval")
    thinking_param = load_section("format").enable_thinking
    if cfg.num_processes > 1 and not launcher.inside_launch():
        # data-parallel generation: the same script in eval.num_processes processes
        have, what = launcher.available_devices()
        if cfg.num_processes > have:
            raise SystemExit(f"evaluate: eval.num_processes: {cfg.num_processes} processes, but "
                             f"this machine has {have} {what}; use eval.num_processes <= {have}")
        plan = {"kind": "ddp", "num_processes": cfg.num_processes, "precision": "auto",
                "mixed_precision": "no",  # the repo's DDP config, wherever the stage runs from
                "config": str(Path(__file__).resolve().parents[1] / launcher.DDP_CONFIG)}
        try:
            launcher.relaunch(plan, __file__, sys.argv[1:], role="evaluation")
        except launcher.LaunchError as exc:
            raise SystemExit(f"evaluate: {exc}") from None
        return
    distributed.init_collectives(distributed.local_device(), timeout_s=600)
    shard = (distributed.rank(), distributed.world_size())
    io.clean_stale_temporaries(*(p for p in (args.metrics, args.predictions, args.report,
                                             args.confusion, args.gain, args.general) if p))
    runtime.seed_everything(args.seed)
    try:
        rows = load_test_rows(args.test)
        text = is_packed_text(rows)
        model, tokenizer, enable_thinking, info = _load(args.kind, args.model, thinking_param, log)
        if text:  # format.mode: text: packed documents, scored by perplexity alone
            metrics, predictions = evaluate_text(model, tokenizer, rows, cfg,
                                                 source=str(args.test), shard=shard)
        else:
            metrics, predictions = evaluate_model(model, tokenizer, rows, cfg,
                                                  enable_thinking=enable_thinking,
                                                  seed=args.seed, source=str(args.test),
                                                  shard=shard)
        general, general_records = ({}, []) if not distributed.is_main() else score_general_text(
            model, tokenizer, load_general_text(cfg.general_text), cfg.batch_size)
    except (EvalDataError, GeneralTextError, FinetunedLoadError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    except NonFiniteLossError as exc:
        raise SystemExit(
            f"evaluate: {args.model}: {exc}; its weights are probably corrupt (`dvc status` "
            f"trusts size and time stamps, so it misses a changed byte). Restore them from the "
            f"DVC cache with `dvc checkout --relink --force {args.model}`, or rebuild them with "
            f"`dvc repro -f` of the stage that writes {args.model}") from None
    if not distributed.is_main():  # its batches are in rank 0's predictions; rank 0 writes
        distributed.finish()
        return
    confusion = metrics.pop("confusion", None)
    metrics["settings"].update(kind=args.kind, model=args.model, method=info.get("method"))
    if not is_finite_metrics(metrics):
        raise SystemExit(f"{args.model}: non-finite metric values: {metrics}")
    io.write_jsonl(args.predictions, predictions)
    io.write_jsonl(args.general, general_records)
    metrics["general_perplexity"] = general["perplexity"]
    metrics["settings"]["general_text"] = {"path": cfg.general_text, "rows": general["rows"],
                                           "tokens": general["tokens"]}
    pairs = io.read_jsonl(args.pairs) if args.pairs and Path(args.pairs).is_file() else []
    preference = None
    if pairs and args.reference:  # data without pairs: every file exactly as before
        reference = model
        if resolve_model_dir(args.reference).resolve() != Path(args.model).resolve():
            from reprotune.train.loading import load_finetuned

            reference = load_finetuned(resolve_model_dir(args.reference),
                                       device=str(next(model.parameters()).device))[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        preference = preference_metrics(model, reference, pairs, batch_size=cfg.batch_size,
                                        pad_id=pad)
        metrics["preference"] = preference
        log.info("preference pairs (%d): reward accuracy %.3f -> %.3f, chosen log-prob shift "
                 "%+.3f", preference["pairs"], preference["sft"]["reward_accuracy"],
                 preference["aligned"]["reward_accuracy"],
                 preference["aligned"]["chosen_logp_shift"])

    base_preds = io.read_jsonl(args.base_predictions) if args.base_predictions else None
    if args.base_metrics:
        comparison = compare(metrics, io.read_json(args.base_metrics))
        out, gain = metrics_file(metrics, comparison)
        if base_preds is not None and not text:  # fine-tuned (b) vs base (a), by row id
            comparison["paired"] = compare_records(base_preds, predictions)
            gain["intervals"] = intervals_file(comparison["paired"])
        if "tasks" in metrics:  # a mixture: each task's gain and paired intervals
            gain["tasks"] = tasks.gain_record(comparison.get("tasks", {}), tasks.task_intervals(
                base_preds, predictions) if base_preds is not None else {})
        if preference is not None:
            gain["preference"] = preference_gain(preference)
        if args.base_general:
            try:
                forgetting = compare_general(io.read_jsonl(args.base_general), general_records)
            except GeneralTextError as exc:
                raise SystemExit(f"evaluate: {exc}") from None
            comparison["forgetting"] = gain["forgetting"] = forgetting
        if args.gain:
            io.write_json(args.gain, gain)
            scorecard.write(args.gain, gain)
    else:
        comparison = compare(metrics, {})
        out = metrics
    io.write_json(args.metrics, out)
    if args.kind != "base":  # the base model's numbers are compared through the gain
        scorecard.write(args.metrics, out)
    if args.confusion:
        plot_confusion(confusion, args.confusion)
    if args.report:
        report = render_report(comparison, metrics["settings"], [] if text else predictions,
                             examples=0 if text else cfg.report_examples, confusion=confusion,
                             confusion_png=(relative_link(args.confusion, args.report)
                                            if args.confusion else None),
                             base_predictions=None if text else base_preds)
        if args.base_metrics and "tasks" in metrics:
            report += tasks.report_section(metrics, io.read_json(args.base_metrics),
                                           gain["tasks"])
        if preference is not None:
            report += report_section(preference)
        if "forgetting" in comparison:
            report += forgetting_section(comparison["forgetting"])
        write_report(args.report, report)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                        if isinstance(v, float) and k in ("bleu", "rouge_l", "f1", "accuracy",
                                                          "perplexity"))
    log.info("%s (%s) on %d rows, max_new_tokens %d (%s): %s; gain %s", args.model, args.kind,
             metrics["n_rows"], metrics["settings"]["max_new_tokens"], cfg.max_new_tokens,
             summary, comparison["gain"] or "n/a")
    if "forgetting" in comparison:
        f = comparison["forgetting"]
        log.info("forgetting check: general-text perplexity %s -> %s, %+g [%s, %s]: %s",
                 f["base"], f["finetuned"], f["diff"], f["low"], f["high"], f["verdict"])
    if metrics["cap_warning"]:
        log.warning("SUMMARY: %.0f%% of answers hit eval.max_new_tokens=%d (more than "
                    "eval.warn_capped=%g): raise it or use `auto`", 100 * metrics["capped_share"],
                    metrics["settings"]["max_new_tokens"], cfg.warn_capped)
    if args.pairs:  # the last line before DVC's warning about the empty file
        io.note_empty(args.pairs, "no preference pairs in the test split (format writes it empty "
                                  "for SFT-only data and logs pairs it dropped), so no preference "
                                  "metrics")
    distributed.finish()  # after rank 0 wrote everything: the other ranks wait here


if __name__ == "__main__":
    main()

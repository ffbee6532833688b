"""Quantised deployment artifacts of the merged model: build each, measure each in a fresh
process, and compare it with the merged reference.

The methods and their files are the families registered in :mod:`reprotune.deploy.artifacts`
(torchao INT8, bitsandbytes, GGUF, ONNX Runtime); one folder each under
``models/quantized/<method>/``. Modules whose name contains a ``keep_full_precision``
fragment are left unquantised. A method that cannot run here (package missing, backend
failing, architecture without a mapping) is recorded as ``skipped`` with the reason, never
dropped silently.

Every artifact carries the chat template and the ``enable_thinking`` setting it was trained
with; the measuring process (:mod:`reprotune.deploy.quant_measure`) renders a probe
conversation with the artifact's own tokenizer and the stage fails if that differs from
training's rendering. :func:`summarize` is the one place deciding whether an artifact meets
the INT8 target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.deploy.artifacts import build_artifact
from reprotune.deploy.merge import (
    MERGED_INFO_FILE,
    directory_size,
    render_difference,
    render_probe,
)
from reprotune.deploy.quant_common import (
    FIRST_TOKENS,
    QUANT_INFO_FILE,
    TARGET_LOSS_PCT,
    MethodUnavailable,
    TemplateMismatch,
)
from reprotune.deploy.quant_measure import FreshMeasurer

log = logging.getLogger(__name__)


def _pct(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0 or not math.isfinite(ref):
        return None
    return round((value - ref) / abs(ref) * 100.0, 4)


def main_metric_name(metrics: dict[str, Any]) -> str:
    """accuracy when classification metrics were computed, else ROUGE-L."""
    return "accuracy" if "accuracy" in metrics else "rouge_l"


def summarize(result: dict[str, Any], ref: dict[str, Any], size: int, ref_size: int,
              built: dict[str, Any] | None) -> dict[str, Any]:
    """The flat metrics row of one measured artifact against the merged reference."""
    m, rm = result["metrics"], ref["metrics"]
    name = main_metric_name(rm)
    first_same = next((i for i, (a, b) in enumerate(zip(result["first_tokens"],
                                                         ref["first_tokens"], strict=True))
                       if a != b), FIRST_TOKENS)
    row = {"status": "ok", "size_mb": round(size / 2**20, 4),
           "compression": round(ref_size / size, 4), "tokens_per_s": result["tokens_per_s"],
           "speedup": round(result["tokens_per_s"] / ref["tokens_per_s"], 4),
           "perplexity": m.get("perplexity"),
           "ppl_delta_pct": _pct(m.get("perplexity"), rm.get("perplexity")),
           "main_metric": name, "main": m.get(name),
           "main_delta": (None if m.get(name) is None or rm.get(name) is None
                          else round(m[name] - rm[name], 6)),
           "main_delta_pct": _pct(m.get(name), rm.get(name)),
           "rouge_l": m.get("rouge_l"), "f1": m.get("f1"), "accuracy": m.get("accuracy"),
           "first_tokens_match": first_same, "template_sha256": result["template_sha256"],
           "render_sha256": result["render_sha256"], "load_s": result["load_s"]}
    if built:
        row.update(layer_error_mean=built["layer_error_mean"],
                   layer_error_max=built["layer_error_max"],
                   worst_layer=(built["worst_layers"][0]["layer"] if built["worst_layers"]
                                else None))
    from reprotune.evaluate.paired import quantise_gate

    # met / missed / too few rows to tell, on the 95% interval of the loss (not the point change)
    row.update(quantise_gate(ref["rows"], result["rows"], name, TARGET_LOSS_PCT))
    return row


def check_format(result: dict[str, Any], ref_render: str, ref_ids: list[int],
                 enable_thinking: bool) -> list[str]:
    """Why ``result``'s prompt format differs from training's (empty when it does not)."""
    problems = []
    if result["enable_thinking"] != enable_thinking:
        problems.append(f"enable_thinking={result['enable_thinking']} but trained with "
                        f"{enable_thinking}")
    diff = render_difference(ref_render, result["render"])
    if diff:
        problems.append(f"chat template renders the probe differently ({diff})")
    elif result["probe_ids"] != ref_ids:
        problems.append("tokenizer encodes the probe conversation to different ids")
    return problems


def _reference_row(ref: dict[str, Any], size: int, merged: dict[str, Any]) -> dict[str, Any]:
    m = ref["metrics"]
    name = main_metric_name(m)
    return {"status": "ok", "size_mb": round(size / 2**20, 4), "tokens_per_s": ref["tokens_per_s"],
            "perplexity": m.get("perplexity"), "main_metric": name, "main": m.get(name),
            "rouge_l": m.get("rouge_l"), "f1": m.get("f1"), "accuracy": m.get("accuracy"),
            "template_sha256": ref["template_sha256"], "render_sha256": ref["render_sha256"],
            "source_method": merged["method"], "merged": merged["merged"],
            "soft_prompt": bool(merged.get("soft_prompt_dir")),
            "load_s": ref["load_s"], "served_without_peft": ref["peft_blocked"]}


def _skip(dest: Path, method: str, reason: str) -> dict[str, Any]:
    import shutil

    log.warning("%s skipped: %s", method, reason)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    row = {"status": "skipped", "reason": reason}
    io.write_json(dest / QUANT_INFO_FILE, {"method": method, **row})
    return row


def quantize_all(merged_dir: str | Path, test_path: str | Path, out_dir: str | Path, *,
                 methods: Sequence[str], keep: Sequence[str], eval_params: dict[str, Any],
                 eval_rows: int, enable_thinking: bool, seed: int,
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build and measure every method; returns ``(metrics, details)``.

    ``metrics`` is flat per artifact (``merged`` and each method); ``details`` holds the worst
    layers per method for the report. Artifacts are published to ``out_dir`` only when every
    artifact formats prompts as training did; otherwise :class:`TemplateMismatch` is raised
    carrying ``(metrics, details)`` so the caller can still write them.
    """
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    merged = io.read_json(merged_dir / MERGED_INFO_FILE)
    tok = load_tokenizer(merged_dir)
    sha = template_fingerprint(tok.chat_template or "")
    if sha != merged["chat_template_sha256"]:
        raise TemplateMismatch(f"{merged_dir}: chat template sha256 {sha[:12]} is not the one "
                               f"training used ({merged['chat_template_sha256'][:12]})")
    if bool(merged["enable_thinking"]) != enable_thinking:
        raise TemplateMismatch(f"format.enable_thinking is {enable_thinking} but the model was "
                               f"trained with {merged['enable_thinking']}: rerun train and merge")
    ref_render = render_probe(tok, enable_thinking)
    ref_ids = tok(ref_render, add_special_tokens=False)["input_ids"]

    def request(method: str, path: Path) -> dict[str, Any]:
        return {"method": method, "path": str(path), "test": str(test_path),
                "eval": dict(eval_params), "eval_rows": eval_rows, "seed": seed}

    with FreshMeasurer() as measurer:  # one serving process; a fresh child per artifact
        log.info("measuring the merged model (reference) in a fresh process")
        ref = measurer.measure(request("merged", merged_dir))
        ref_size = directory_size(merged_dir)
        metrics: dict[str, Any] = {"merged": _reference_row(ref, ref_size, merged),
                                   "chat_template_sha256": sha, "enable_thinking": enable_thinking,
                                   "n_eval_rows": ref["metrics"].get("n_rows"),
                                   "target_loss_pct": TARGET_LOSS_PCT}
        details: dict[str, Any] = {"worst_layers": {}, "failures": []}
        problems = check_format(ref, ref_render, ref_ids, enable_thinking)
        metrics["merged"]["template_ok"] = not problems
        details["failures"] += [f"merged: {p}" for p in problems]
        float_model = load_model(merged_dir, dtype=torch.float32)
        with io.atomic_dir(out_dir) as tmp:
            for method in dict.fromkeys(methods):  # ordered, duplicates dropped
                dest = tmp / method
                try:
                    built = build_artifact(method, merged_dir, dest, keep, float_model)
                except MethodUnavailable as exc:
                    metrics[method] = _skip(dest, method, str(exc))
                    continue
                log.info("%s built (%s); measuring in a fresh process", method,
                         f"{directory_size(dest) / 2**20:.3f} MiB")
                try:
                    result = measurer.measure(request(method, dest))
                except RuntimeError as exc:
                    if not method.startswith("bnb"):
                        raise
                    metrics[method] = _skip(dest, method, f"built, but bitsandbytes inference "
                                                          f"failed on this machine: {exc}")
                    continue
                row = summarize(result, ref, directory_size(dest), ref_size, built)
                problems = check_format(result, ref_render, ref_ids, enable_thinking)
                row["template_ok"] = not problems
                details["failures"] += [f"{method}: {p}" for p in problems]
                details["worst_layers"][method] = built["worst_layers"]
                metrics[method] = row  # no timings in the artifact: its bytes are reproducible
                log.info("%s: %.3f MiB (x%.2f), %.1f tok/s, ppl %s (%s%%), %s %s (%s%%)",
                         method, row["size_mb"], row["compression"], row["tokens_per_s"],
                         row["perplexity"], row["ppl_delta_pct"], row["main_metric"], row["main"],
                         row["main_delta_pct"])
            metrics["format_ok"] = not details["failures"]
            if details["failures"]:
                raise TemplateMismatch("prompt format differs from training: "
                                       + "; ".join(details["failures"]), (metrics, details))
        return metrics, details

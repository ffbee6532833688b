"""The quantisation report: one Markdown table row per artifact, skipped methods with their
reasons, the INT8 target verdicts, the worst layers and the prompt-format check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reprotune.deploy.artifacts import INT8_METHODS
from reprotune.deploy.merge import SOFT_PROMPT_DIR
from reprotune.deploy.quant_common import (
    FIRST_TOKENS,
    SPEED_NEW_TOKENS,
    SPEED_PROMPTS,
    SPEED_ROUNDS,
    TARGET_LOSS_PCT,
)


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _delta(row: dict[str, Any]) -> str:
    """Relative main-metric change, or the absolute one where the reference is 0."""
    if row.get("main_delta_pct") is not None:
        return f"{row['main_delta_pct']:+.2f}%"
    return "–" if row.get("main_delta") is None else f"{row['main_delta']:+.4g} (abs)"


def report_markdown(metrics: dict[str, Any], details: dict[str, Any],
                    methods: Sequence[str]) -> str:
    """The Markdown report: one table row per artifact, reasons, worst layers, checks."""
    ref = metrics["merged"]
    name = ref["main_metric"]
    lines = ["# Quantisation report", "",
             f"Reference: merged model (`{ref['source_method']}`, merged: {ref['merged']}). "
             f"Main metric: **{name}** on {metrics.get('n_eval_rows')} test rows; perplexity is "
             f"corpus-level over assistant tokens. Every artifact was loaded and measured in a "
             f"fresh process. GGUF files are measured through transformers' GGUF loader, which "
             f"dequantises them to float32: their quality numbers are the file's, their "
             f"speed is not llama.cpp's. ONNX graphs run in ONNX Runtime (no KV cache: each "
             f"token recomputes the sequence); onnx_fp32 holds float32 weights. int8_dynamic "
             f"is torchao's dynamic INT8. CPU speed (greedy, {len(SPEED_PROMPTS)} fixed prompts x "
             f"{SPEED_NEW_TOKENS} new tokens, batch 1, best of {SPEED_ROUNDS} rounds) changes "
             f"from run to run, so it is in the untracked `metrics/timing/quantize.json`, not "
             f"here.", "",
             f"| artifact | status | size MiB | compression | perplexity | Δppl % "
             f"| {name} | Δ{name} | first greedy tokens = merged | layer err mean / max "
             f"| template ok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| merged | ok | {_fmt(ref['size_mb'])} | 1 "
                 f"| {_fmt(ref['perplexity'])} | – | {_fmt(ref['main'])} | – | "
                 f"{FIRST_TOKENS}/{FIRST_TOKENS} | – | {ref.get('template_ok')} |")
    for m in dict.fromkeys(methods):
        row = metrics.get(m, {})
        if row.get("status") != "ok":
            lines.append(f"| {m} | skipped | – | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {m} | ok | {_fmt(row['size_mb'])} | {_fmt(row['compression'], '.2f')} "
            f"| {_fmt(row['perplexity'])} "
            f"| {_fmt(row['ppl_delta_pct'], '+.2f')} | {_fmt(row['main'])} "
            f"| {_delta(row)} | {row['first_tokens_match']}/{FIRST_TOKENS} "
            f"| {_fmt(row.get('layer_error_mean'))} / {_fmt(row.get('layer_error_max'))} "
            f"| {row['template_ok']} |")
    if ref.get("soft_prompt"):
        lines += ["", f"Soft prompt: `{ref['source_method']}` cannot be merged, so every artifact "
                      f"is the quantised base plus the kept `{SOFT_PROMPT_DIR}/` adapter (measured "
                      f"with it through peft). llama.cpp / Ollama cannot apply it: the GGUF files "
                      f"alone serve the base model."]
    skipped = [(m, metrics[m]["reason"]) for m in dict.fromkeys(methods)
               if metrics.get(m, {}).get("status") == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- **{m}**: {r}" for m, r in skipped]
    lines += ["", f"## INT8 target (loss < {TARGET_LOSS_PCT:g}% relative on mean token NLL and "
                  f"< {TARGET_LOSS_PCT / 100:g} absolute on {name}, for the whole 95% "
                  f"paired-bootstrap interval)", ""]
    for m in INT8_METHODS:
        row = metrics.get(m)
        if row and row.get("status") == "ok":
            verdict = row["gate"] if row["gate"] != "missed" else "**missed**"
            lines.append(f"- {m}: NLL loss {_fmt(row.get('ppl_loss_pct'), '+.3f')}% (interval "
                         f"up to {_fmt(row.get('ppl_loss_pct_high'), '+.3f')}%), {name} loss "
                         f"{_fmt(row.get('main_loss'), '+.4f')} (up to "
                         f"{_fmt(row.get('main_loss_high'), '+.4f')}) on {row['gate_rows']} "
                         f"rows ({name}: {row.get('main_rows')}) -> {verdict}")
    if details.get("worst_layers"):
        lines += ["", "## Worst layers (relative Frobenius error of W vs dequantised W)", ""]
        for m, worst in details["worst_layers"].items():
            if worst:
                lines.append(f"- {m}: " + ", ".join(f"`{w['layer']}` {w['rel_error']:.4g}"
                                                     for w in worst))
    lines += ["", "## Prompt format", "",
              f"Training template sha256 `{metrics['chat_template_sha256']}`, enable_thinking "
              f"{metrics['enable_thinking']}. Each artifact's own template rendered the probe "
              f"conversation (system, user, assistant, user + generation prompt)."]
    if details.get("failures"):
        lines += ["", "**FAILED:**", ""] + [f"- {f}" for f in details["failures"]]
    else:
        lines.append("All artifacts render it identically to training.")
    return "\n".join(lines) + "\n"

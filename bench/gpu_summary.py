"""The one-call GPU check's results in one JSON and one table, against the targets.

Reads what ``bench/gpu_check.sh`` left in ``OUT`` (``throughput_default.json``,
``throughput_lean.json``, ``profile_full.json``, ``env.txt``; any may be missing: a failed
step is reported, not fatal), checks the targets of issue 9 / 19 and writes
``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (the table for docs/gpu.md):

    python bench/gpu_summary.py bench/results/gpu_check
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from reprotune import io  # noqa: E402

SETTINGS = ("default", "lean")
METHODS = ("baseline", "full", "lora", "qlora")
# (issue 9's targets) tokens/s and x baseline for full at the default settings; peak GiB at lean
TARGET_TOKENS_S, TARGET_SPEEDUP = 70_000, 8.0
TARGET_LEAN_GIB = {"full": 16.0, "lora": 8.0, "qlora": 6.0}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return io.read_json(path)
    except (OSError, ValueError):
        return None


def targets(runs: dict[str, dict[str, Any]], on_gpu: bool) -> dict[str, Any]:
    """Each target: the figure, the bound and whether it is met (None: not measured)."""
    default = runs.get("default") or {}
    lean = runs.get("lean") or {}
    full = default.get("full") or {}
    out: dict[str, Any] = {}
    rate, speedup = full.get("tokens_per_s"), full.get("speedup_vs_baseline")
    out["full_tokens_per_s"] = {"value": rate, "target": TARGET_TOKENS_S,
                                "met": None if rate is None or not on_gpu else rate >= TARGET_TOKENS_S}
    out["full_speedup"] = {"value": speedup, "target": TARGET_SPEEDUP,
                           "met": None if speedup is None or not on_gpu else speedup >= TARGET_SPEEDUP}
    lora = (default.get("lora") or {}).get("tokens_per_s")
    out["lora_at_least_full"] = {"value": lora, "target": rate,
                                 "met": None if None in (lora, rate) or not on_gpu else lora >= rate}
    for method, bound in TARGET_LEAN_GIB.items():
        r = lean.get(method) or {}
        gib = r.get("peak_memory_gib") if r.get("peak_memory_kind") == "cuda_max_memory_allocated" else None
        out[f"lean_{method}_peak_gib"] = {"value": gib, "target": bound,
                                          "met": None if gib is None else gib <= bound}
    return out


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| settings | run | tokens/s | x baseline | MFU | peak GiB | attention | loss |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for setting in SETTINGS:
        for method, r in (runs.get(setting) or {}).items():
            if r.get("status") != "ok":
                lines.append(f"| {setting} | {method} | failed: {str(r.get('reason'))[:80]} "
                             f"| | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            rate = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            lines.append(f"| {setting} | {method} | {rate} | {r.get('speedup_vs_baseline') or '-'} "
                         f"| {mfu} | {r.get('peak_memory_gib')} | {r.get('attention', 'sdpa')} "
                         f"| {r.get('loss_impl')} |")
    return "\n".join(lines)


def summarize(out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    reports = {s: _read(out / f"throughput_{s}.json") for s in SETTINGS}
    runs = {s: (r or {}).get("runs", {}) for s, r in reports.items()}
    profile = _read(out / "profile_full.json")
    first = next((r for r in reports.values() if r), {}) or {}
    on_gpu = bool((first.get("versions") or {}).get("cuda"))
    env = (out / "env.txt").read_text(encoding="utf-8") if (out / "env.txt").is_file() else ""
    summary = {
        "device": first.get("device"), "versions": first.get("versions"), "env": env.strip(),
        "commands": {s: (r or {}).get("command") for s, r in reports.items()},
        "steps": {s: "ok" if r else "missing (see its log)" for s, r in
                  {**reports, "profile": profile}.items()},
        "runs": runs, "targets": targets(runs, on_gpu),
        "profile_top": (profile or {}).get("top"),
    }
    io.write_json(out / "gpu_check.json", summary)
    text = markdown(runs)
    with io.atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    print(text)
    for name, t in summary["targets"].items():
        print(f"target {name}: {t['value']} vs {t['target']}: "
              f"{ {True: 'met', False: 'MISSED', None: 'not measured'}[t['met']] }")
    return summary


if __name__ == "__main__":
    summarize(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu_check")

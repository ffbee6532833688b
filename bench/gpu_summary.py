"""The one-call GPU check's results in one JSON and one table, against the targets.

Reads what ``bench/gpu_check.sh`` left in ``OUT`` (``throughput_default.json``,
``throughput_lean.json``, ``profile_full.json``, ``env.txt``, the tests' JUnit XML,
``timings.txt``; any may be missing: a failed step is reported, not fatal), checks the
targets of issue 9 / 19, counts the tests passed and failed and the fast paths that fell
back (``fast_path_fallbacks`` of every run), and writes
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
    lines = ["| settings | run | tokens/s | tokens/step | x baseline | MFU | peak GiB (allocated "
             "/ reserved / device) | attention | loss |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for setting in SETTINGS:
        for method, r in (runs.get(setting) or {}).items():
            if r.get("status") != "ok":
                lines.append(f"| {setting} | {method} | failed: {str(r.get('reason'))[:80]} "
                             f"| | | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            rate = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            mem = " / ".join(str(r.get(k, "n/a")) for k in ("peak_memory_gib", "peak_reserved_gib",
                                                            "device_peak_gib"))
            lines.append(f"| {setting} | {method} | {rate} | {r.get('tokens_per_step') or '-'} "
                         f"| {r.get('speedup_vs_baseline') or '-'} | {mfu} | {mem} "
                         f"| {r.get('attention', 'sdpa')} | {r.get('loss_impl')} |")
    return "\n".join(lines)


def tests(path: Path) -> dict[str, Any] | None:
    """A pytest JUnit XML: counts and the failed tests' names (None: no file, e.g. cut by
    its cap; the step's log still has every result printed as it happened)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"tests": len(cases), "failed": len(failed), "skipped": skipped,
            "passed": len(cases) - len(failed) - skipped, "failed_tests": failed}


def fallbacks(runs: dict[str, dict[str, Any]], profile: dict[str, Any] | None) -> dict[str, Any]:
    """Every fast path that failed and fell back (``fast_path_fallbacks`` of each run)."""
    found = {f"{setting}/{method}": r["fast_path_fallbacks"]
             for setting, by_method in runs.items() for method, r in by_method.items()
             if r.get("fast_path_fallbacks")}
    prof = ((profile or {}).get("run") or {}).get("fast_path_fallbacks")
    if prof:
        found["profile/full"] = prof
    return {"count": sum(len(v) for v in found.values()), "runs": found}


def timings(path: Path) -> dict[str, dict[str, Any]]:
    """``timings.txt`` (one line per step: name cap=..s took=..s exit=..)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        name, *fields = line.split()
        kv = dict(f.split("=", 1) for f in fields if "=" in f)
        out[name] = {"cap_s": int(kv.get("cap", "0s").rstrip("s")),
                     "took_s": int(kv.get("took", "0s").rstrip("s")), "exit": int(kv.get("exit", -1))}
    return out


def summarize(out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    reports = {s: _read(out / f"throughput_{s}.json") for s in SETTINGS}
    runs = {s: (r or {}).get("runs", {}) for s, r in reports.items()}
    profile = _read(out / "profile_full.json")
    first = next((r for r in reports.values() if r), {}) or {}
    on_gpu = bool((first.get("versions") or {}).get("cuda"))
    env = (out / "env.txt").read_text(encoding="utf-8") if (out / "env.txt").is_file() else ""
    steps = {s: "ok" if r else "missing (see its log)" for s, r in reports.items()}
    steps["profile"] = ("missing (see its log)" if not profile else "ok" if profile.get("complete")
                        else f"partial ({profile.get('profiled_steps')} of "
                             f"{profile.get('planned_steps')} profiled steps; see its log)")
    summary = {
        "device": first.get("device"), "versions": first.get("versions"), "env": env.strip(),
        "commands": {s: (r or {}).get("command") for s, r in reports.items()},
        "steps": steps,
        "runs": runs, "targets": targets(runs, on_gpu),
        "profile_top": (profile or {}).get("top"),
        "profile_complete": (profile or {}).get("complete"),
        "tests": {name: tests(out / f"{name}.xml") for name in ("cuda_tests", "training_tests")},
        "fast_path_fallbacks": fallbacks(runs, profile),
        "timings": timings(out / "timings.txt"),
    }
    io.write_json(out / "gpu_check.json", summary)
    text = markdown(runs)
    with io.atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    print(text)
    for name, t in summary["targets"].items():
        print(f"target {name}: {t['value']} vs {t['target']}: "
              f"{ {True: 'met', False: 'MISSED', None: 'not measured'}[t['met']] }")
    for name, t in summary["tests"].items():
        print(f"{name}: " + ("no JUnit XML (see its log)" if t is None else
                             f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} "
                             f"skipped {t['failed_tests'] or ''}"))
    fb = summary["fast_path_fallbacks"]
    print(f"fast-path fallbacks: {fb['count']}" + (f" {fb['runs']}" if fb["count"] else ""))
    for name, t in summary["timings"].items():
        print(f"step {name}: {t['took_s']} s of its {t['cap_s']} s cap, exit {t['exit']}")
    return summary


if __name__ == "__main__":
    summarize(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu_check")

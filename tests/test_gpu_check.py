"""bench/gpu_check.sh's python steps, run on CPU on the tiny model (GPU_CHECK_CPU=1), so a typo
in the script or its commands cannot waste a GPU run; and its summary of missing steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_CPU": "1", "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout[-4000:]
    assert "gpu_check: done" in done.stdout
    assert "varlen: torch " in (out / "env.txt").read_text()
    # the CUDA test selections name the real tests (collected here, run on a GPU)
    tests = (out / "cuda_tests.log").read_text() + (out / "training_tests.log").read_text()
    for name in ("test_cuda_pack_matches_alone", "test_cuda_lean_losses_match_stock",
                 "test_packed_and_unpacked_training_give_the_same_loss_curve",
                 "test_dpo_raises_test_reward_accuracy_and_writes_curves",
                 "test_new_methods_raise_test_reward_accuracy_and_write_curves",
                 "test_lora_sft_adapter_with_kto_and_orpo"):
        assert name in tests, tests[-2000:]
    # every step ran under its cap, and its time was kept
    steps = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert steps == ["cuda_tests", "throughput_default", "throughput_lean", "profile_full",
                     "training_tests", "summary"]
    default, lean = (io.read_json(out / f"throughput_{s}.json") for s in ("default", "lean"))
    assert list(default["runs"]) == ["baseline", "full", "lora", "qlora"]
    assert list(lean["runs"]) == ["full", "lora", "qlora"]  # the memory targets
    assert default["settings"]["gradient_checkpointing"] is False
    assert lean["settings"]["gradient_checkpointing"] is True
    assert lean["settings"]["tokens_per_batch"] == default["settings"]["tokens_per_batch"] == 256
    for report in (default, lean):
        for name in ("baseline", "full", "lora"):
            if name not in report["runs"]:
                continue
            assert report["runs"][name]["status"] == "ok", report["runs"][name]
            assert report["runs"][name]["tokens_per_s"] > 0
            assert report["runs"][name]["peak_reserved_gib"] == "n/a"  # CUDA only
        # the packed path the GPU runs by default: packs, packed attention, the lean loss
        for name in ("full", "lora"):
            run = report["runs"][name]
            assert run["packing_style"] == "packs" and run["attention"] == "sdpa per sample"
            assert run["loss_impl"] == "chunked" and run["fast_path_fallbacks"] == {}
    # the baseline trains about the stage's real tokens per optimizer step
    budget = default["tokens_per_step"]
    assert budget["stage_budget"] == 256 and budget["baseline_grad_accum"] >= 2
    assert default["runs"]["baseline"]["grad_accum"] == budget["baseline_grad_accum"]
    assert 0.6 * 256 <= default["runs"]["baseline"]["tokens_per_step"] <= 1.5 * 256
    profile = io.read_json(out / "profile_full.json")
    assert profile["method"] == "full" and profile["device_kernels"] is False
    assert 5 <= len(profile["top"]) <= 15 and profile["profiled_steps"] == 2
    assert profile["complete"] is True and profile["run"]["packing_style"] == "packs"
    shares = [r["share"] for r in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert all(r["calls"] > 0 and r["self_ms"] > 0 for r in profile["top"])
    table = (out / "profile_full.txt").read_text().splitlines()
    assert "CPU op (self CPU time; no GPU here)" in table[0] and len(table) == len(profile["top"]) + 1
    summary = io.read_json(out / "gpu_check.json")
    assert summary["steps"] == {"default": "ok", "lean": "ok", "profile": "ok"}
    assert summary["fast_path_fallbacks"] == {"count": 0, "runs": {}}
    assert summary["tests"]["cuda_tests"]["failed"] == 0  # --collect-only: nothing ran
    assert summary["timings"]["throughput_default"]["exit"] == 0
    assert summary["targets"]["full_tokens_per_s"]["met"] is None  # not measured on a CPU
    assert summary["targets"]["lean_full_peak_gib"]["value"] is None  # RSS is not GPU memory
    md = (out / "gpu_check.md").read_text().splitlines()
    assert len(md) == 2 + 7 and md[2].startswith("| default | baseline |")


def test_summary_says_which_steps_are_missing(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_summary

    summary = gpu_summary.summarize(tmp_path)
    assert summary["steps"] == {"default": "missing (see its log)", "lean": "missing (see its log)",
                                "profile": "missing (see its log)"}
    assert all(t["met"] is None for t in summary["targets"].values())
    assert (tmp_path / "gpu_check.json").is_file() and (tmp_path / "gpu_check.md").is_file()


SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _gpu_caps() -> dict[str, int]:
    """The GPU branch's caps (the last ``T_CUDA=...`` line of the script)."""
    line = [ln for ln in SCRIPT.read_text().splitlines() if ln.strip().startswith("T_CUDA=")][-1]
    return {k: int(v) for k, v in (f.split("=") for f in line.split())}


def test_the_caps_fit_seven_minutes_and_the_docs_say_their_sum():
    caps = _gpu_caps()
    assert set(caps) == {"T_CUDA", "T_RUN", "T_LEAN", "T_PROFILE", "T_TRAIN", "T_SUMMARY"}
    total = sum(caps.values())
    # one run with ~20 s of wheels and versions fits 7 minutes of device time
    assert total + 20 <= 7 * 60
    text = SCRIPT.read_text()
    assert f"caps sum to {total} s" in text and f"caps below, {total} s" in text
    doc = (ROOT / "docs" / "gpu.md").read_text()
    found = re.search(r"The step caps add up to (\d+) s", doc)
    assert found and int(found.group(1)) == total, found
    # every step uses its cap: one step() per T_ variable
    for name in caps:
        assert f'"${name}"' in text, name


def test_every_timeout_kills_and_pytest_prints_failures_as_they_happen():
    text = SCRIPT.read_text()
    calls = re.findall(r"\btimeout\b[^\n]*", "\n".join(
        ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    assert calls and all(c.startswith("timeout -k 10 ") for c in calls), calls
    for flag in ("-p live_failures", "-p no:cacheprovider", "console_output_style=classic",
                 "--tb=short", "-rfE", "-v"):
        assert flag in text, flag
    assert text.count('--junitxml="$OUT/') == 2


def test_live_failures_plugin_prints_a_failure_before_the_session_ends(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import time\n"
        "def test_fails():\n    assert 1 == 2, 'boom'\n"
        "def test_slow():\n    time.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "pytest_plugins")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "live_failures", "-p",
                             "no:cacheprovider", "-p", "no:xdist", "-q", "--tb=short",
                             str(tmp_path / "test_x.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # read until the failure shows up, while test_slow still sleeps: then stop it, as a cap
        seen = ""
        for line in proc.stdout:
            seen += line
            if "!!! end of" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert "!!! FAILED test_x.py::test_fails (call" in seen and "boom" in seen, seen


def test_profile_counts_device_kernels_only():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_profile

    def ev(key, kind, us, count=1, annotation=False, legacy=False, cpu_us=5.0):
        return SimpleNamespace(key=key, device_type=kind, self_device_time_total=us,
                               count=count, is_user_annotation=annotation, is_legacy=legacy,
                               self_cpu_time_total=cpu_us)

    step = [ev("ampere_bf16_gemm", DeviceType.CUDA, 600.0, 4),
            ev("flash_fwd_kernel", DeviceType.CUDA, 300.0, 2),
            ev("aten::mm", DeviceType.CPU, 600.0, 4),  # a CPU op carrying its kernel's time
            ev("Optimizer.step#AdamW.step", DeviceType.CUDA, 100.0, annotation=True),
            ev("ProfilerStep*", DeviceType.CPU, 900.0, annotation=True),
            ev("legacy_kernel_op", DeviceType.CPU, 100.0, legacy=True)]
    totals: dict = {}
    kernel_profile.accumulate(totals, step, device=True)
    kernel_profile.accumulate(totals, step, device=True)  # a second profiled step
    top = kernel_profile.top_kernels(totals, 15)
    assert [r["kernel"] for r in top] == ["ampere_bf16_gemm", "flash_fwd_kernel",
                                          "legacy_kernel_op"]
    assert top[0] == {"kernel": "ampere_bf16_gemm", "calls": 8, "self_ms": 1.2, "share": 0.6}
    assert abs(sum(r["share"] for r in top) - 1) < 1e-9
    # an older torch without is_user_annotation / self_device_time_total: read by attribute
    old = SimpleNamespace(key="k", device_type=DeviceType.CUDA, self_cuda_time_total=50.0,
                          count=1, self_cpu_time_total=0.0)
    assert kernel_profile.is_device_kernel(old)
    assert kernel_profile.self_time_us(old, device=True) == 50.0
    # on CPU: CPU ops by self CPU time, no annotations
    cpu: dict = {}
    kernel_profile.accumulate(cpu, step, device=False)
    assert set(cpu) == {"aten::mm", "legacy_kernel_op"}


def test_summary_counts_tests_fallbacks_and_timings(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_summary

    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_packing" name="test_a"/>'
        '<testcase classname="tests.test_packing" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_lean_loss" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    io.write_json(tmp_path / "throughput_default.json", {"runs": {
        "full": {"status": "ok", "fast_path_fallbacks": {"varlen": "RuntimeError: no"}},
        "lora": {"status": "ok", "fast_path_fallbacks": {}}}})
    io.write_json(tmp_path / "profile_full.json", {"complete": False, "profiled_steps": 1,
                                                   "planned_steps": 3, "top": []})
    (tmp_path / "timings.txt").write_text("cuda_tests cap=45s took=12s exit=0\n"
                                          "profile_full cap=45s took=45s exit=124\n")
    summary = gpu_summary.summarize(tmp_path)
    assert summary["tests"]["cuda_tests"] == {"tests": 3, "failed": 1, "skipped": 1, "passed": 1,
                                              "failed_tests": ["tests.test_packing::test_b"]}
    assert summary["tests"]["training_tests"] is None
    assert summary["fast_path_fallbacks"] == {
        "count": 1, "runs": {"default/full": {"varlen": "RuntimeError: no"}}}
    assert summary["steps"]["profile"].startswith("partial (1 of 3 profiled steps")
    assert summary["timings"]["profile_full"] == {"cap_s": 45, "took_s": 45, "exit": 124}

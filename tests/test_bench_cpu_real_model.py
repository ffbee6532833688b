"""bench/cpu_real_model.py: every arm in its own process, the same rows, figures and verdicts.

On the tiny model with 2 timed steps (the real benchmark runs SmolLM2-135M-Instruct): about
a minute on 2 busy cores, most of it starting one Python process per arm.
"""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench

from reprotune import PORTABLE_ENV, io
from reprotune.train.cpu import cpu_bf16

ARMS = "hf,trl,portable,fast"


@pytest.mark.slow
def test_cpu_real_model_runs_every_arm_on_the_same_rows(tmp_path, repo_root, tiny_base_dir,
                                                        capsys):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Count from {i} to {i + 5}.", "input": "",
                                 "output": " ".join(str(i + j) for j in range(6))}
                                for i in range(40)]), encoding="utf-8")
    out = tmp_path / "cpu.json"
    argv = ["--base", str(tiny_base_dir), "--data", str(data), "--arms", ARMS, "--steps", "2",
            "--warmup-steps", "1", "--repeats", "1", "--max-length", "64", "--val-rows", "4",
            "--threads", "1", "--out", str(out)]
    load_bench("cpu_real_model").main(argv)
    report = io.read_json(out)
    assert report["command"] == "python bench/cpu_real_model.py " + " ".join(argv)
    assert report["machine"]["cpu"] and "avx512_bf16" in report["machine"]["flags"]
    assert {"torch", "transformers", "trl"} <= set(report["versions"])
    assert report["data"]["rows"] == 40 and report["data"]["val_rows"] == 4
    assert report["cpu_envs"] == {"pinned": PORTABLE_ENV}
    res = report["results"]["pinned"]
    runs = {arm: a["runs"][0] for arm, a in res["arms"].items()}
    assert set(runs) == set(ARMS.split(","))
    for arm, r in runs.items():
        assert r["status"] == "ok", (arm, r)
        assert r["timed_steps"] == 2 and r["steps"] == 3 and r["tokens_per_s"] > 0
        assert r["peak_rss_train_mb"] > 0 and r["final_val_loss"] > 0
        assert r["env"]["MKL_CBWR"] == "COMPATIBLE" and r["torch_threads"] == 1
        assert r["cpu_capability"] == "AVX2"  # the pin reached every arm
        assert r["loadavg_before"] is not None
    # the same rows in the same order: every arm timed the same real tokens
    assert len({r["timed_tokens"] for r in runs.values()}) == 1
    # hf, TRL and portable take the same fp32 steps on the same rows
    assert runs["portable"]["final_val_loss"] == pytest.approx(runs["hf"]["final_val_loss"],
                                                              rel=1e-4)
    assert runs["trl"]["final_val_loss"] == pytest.approx(runs["hf"]["final_val_loss"], rel=1e-4)
    assert runs["portable"]["events"] == ["evaluate after step 0", "evaluate after step 3",
                                          "save after step 3"]  # none inside the timed steps
    assert runs["portable"]["mode"] == "portable" and runs["portable"]["precision"] == "fp32"
    assert runs["portable"]["packing_style"] == "padding_free"
    assert runs["fast"]["mode"] == "fast"
    assert runs["fast"]["precision"] == ("bf16" if cpu_bf16() else "fp32")
    assert set(res["speedup_vs_trl"]) == {"portable", "fast"}
    for name in ("portable_vs_trl", "fast_vs_trl"):
        t = res["targets"][name]
        assert t["speedup"] > 0 and isinstance(t["met"], bool)
        assert isinstance(t["val_loss_within_1pct"], bool)
    printed = capsys.readouterr().out
    assert "portable_vs_trl" in printed and "command: python bench/cpu_real_model.py" in printed


def test_unknown_arm_is_refused(repo_root):
    with pytest.raises(SystemExit):
        load_bench("cpu_real_model").parse_args(["--arms", "hf,deepspeed"])

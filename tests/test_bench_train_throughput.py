"""bench/train_throughput.py runs the baseline and the stage's methods on a tiny shape."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench

from reprotune import io

TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--vocab", "512", "--median", "24",
        "--min-len", "4", "--max-len", "64", "--steps", "4", "--warmup-steps", "1",
        "--tokens-per-batch", "256", "--baseline-batch-size", "4", "--lr", "1e-3"]


def test_workload_is_seeded_lognormal_and_clipped(repo_root):
    bench = load_bench("train_throughput")
    args = bench.parse_args(["--vocab", "1000", "--seed", "3"])
    rows = bench.workload(4000, args)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert lengths[0] >= 32 and lengths[-1] <= 2048 and lengths[-1] == 2048  # clipped
    assert 230 <= lengths[len(lengths) // 2] <= 280  # median 256
    assert all(r["labels"] == r["input_ids"] for r in rows)  # every token labelled
    assert bench.workload(5, args) == bench.workload(5, args)
    shape = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
             "vocab_size": 151936}
    one = [{"input_ids": [0] * 256}]
    # Qwen3-0.6B: 596M params of which 440M in decoder matmuls + 156M head -> 6N = 3.58 GFLOP
    assert bench.flops_per_token(shape, one) == pytest.approx(
        6 * (28 * (1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072)
             + 151936 * 1024) + 6 * 28 * 2048 * 256)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert bench.peak_flops("CPU: x", None) is None and bench.peak_flops("x", 100) == 1e14


def test_throughput_smoke_on_cpu(tmp_path, repo_root, capsys):
    out = tmp_path / "throughput.json"
    load_bench("train_throughput").main([*TINY, "--out", str(out)])
    report = io.read_json(out)
    assert report["command"] == "python bench/train_throughput.py " + " ".join(TINY) + f" --out {out}"
    assert {"torch", "transformers", "peft", "bitsandbytes", "liger_kernel", "cuda"} <= set(
        report["versions"])
    assert report["workload"]["max_len"] == 64 and report["settings"]["tokens_per_batch"] == 256
    runs = report["runs"]
    assert list(runs) == ["baseline", "full", "lora", "qlora"]
    for name in ("baseline", "full", "lora"):
        r = runs[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 3 and r["peak_memory_gib"] > 0
        assert r["mfu"] is None  # no bf16 peak known for a CPU
    assert runs["full"]["packing"] is True and runs["full"]["loss_impl"] == "chunked"
    assert runs["full"]["batch"] == "4 rows, padding-free x 1"  # the CPU default
    assert runs["full"]["speedup_vs_baseline"] > 0
    # bitsandbytes 4-bit may or may not run on this CPU: either way it is a recorded result
    assert runs["qlora"]["status"] == "ok" or runs["qlora"]["reason"]
    # the baseline accumulates to about the stage's real tokens per optimizer step (256)
    assert report["tokens_per_step"]["stage_budget"] == 256
    assert runs["baseline"]["grad_accum"] == report["tokens_per_step"]["baseline_grad_accum"] >= 2
    assert 0.6 * 256 <= runs["baseline"]["tokens_per_step"] <= 1.5 * 256
    assert runs["baseline"]["peak_reserved_gib"] == runs["full"]["device_peak_gib"] == "n/a"
    # the stage's final save was skipped only inside main()
    from reprotune.train import loading, training

    assert training.save_finetuned is loading.save_finetuned
    printed = capsys.readouterr().out
    assert "baseline" in printed and "command: python bench/train_throughput.py" in printed

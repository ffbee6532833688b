"""bench/train_speed.py runs the train stage per method on a tiny shape and reports figures."""

from __future__ import annotations

from bench_scripts import load_bench

from reprotune import io

TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--vocab", "512", "--seq-len", "32",
        "--steps", "4", "--batch-size", "2", "--methods", "full,lora"]


def test_train_speed_reports_every_method(tmp_path, repo_root, capsys):
    out = tmp_path / "train_cpu.json"
    load_bench("train_speed").main([*TINY, "--out", str(out)])
    report = io.read_json(out)
    assert report["command"] == "python bench/train_speed.py " + " ".join(TINY) + f" --out {out}"
    assert report["device"] and {"python", "torch", "transformers", "peft", "bitsandbytes",
                                 "cuda"} <= set(report["versions"])
    shape = report["model_shape"]
    assert shape["num_hidden_layers"] == 1 and shape["vocab_size"] == 512
    assert shape["max_position_embeddings"] == 40960 and shape["tie_word_embeddings"]
    assert set(report["methods"]) == {"full", "lora"}
    for r in report["methods"].values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_steady"] > 0
        assert r["peak_memory_mb"] > 0 and r["peak_memory_kind"]
        assert r["train_steps"] == 4 and r["tokens_seen"] == 4 * 2 * 32
        assert r["initial_val_loss"] > 0 and r["best_val_loss"] > 0
    assert report["methods"]["full"]["trainable_share"] == 1.0
    assert 0 < report["methods"]["lora"]["trainable_share"] < 0.5
    printed = capsys.readouterr().out
    assert "full " in printed and "lora " in printed and "command: python bench/" in printed


def test_a_failing_method_is_recorded_and_the_rest_run(tmp_path, repo_root):
    bench = load_bench("train_speed")
    args = bench.parse_args([*TINY])
    failed = bench.run_method("full", tmp_path, tmp_path / "missing_base",
                              (tmp_path / "t.parquet", tmp_path / "v.parquet"), args)
    assert failed["status"] == "failed" and failed["reason"]

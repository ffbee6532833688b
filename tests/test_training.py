"""The training loop: every method learns, artifacts reload, bad input fails early, resume."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from reprotune import io
from reprotune.params import LoraParams, PromptParams, TopParams, TrainParams
from reprotune.train.data import check_rows, eval_indices
from reprotune.train.loading import load_finetuned
from reprotune.train.methods import TrainSetupError
from reprotune.train.training import (
    COUNTERS_FILE,
    RUN_STATE_FILE,
    PaddingCollator,
    RunConfig,
    check_sizes,
    mean_logged_loss,
    out_of_memory_advice,
    resolve_precision,
    resume_point,
    train_model,
    training_arguments,
)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
LIVE_TSVS = {"train_loss.tsv", "val_loss.tsv", "learning_rate.tsv", "grad_norm.tsv"}


def make_rows(n: int, seed: int, *, down: bool = False, answer_len: int = 12) -> list[dict]:
    """A random 4-token prompt (masked) then a counting run the model can learn (labelled)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(40, 60)
        prompt = [rng.randrange(10, 300) for _ in range(4)]
        answer = [start - j if down else start + j for j in range(answer_len)]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * 4 + answer})
    return rows


def write_splits(root: Path, train: list[dict], val: list[dict]) -> tuple[Path, Path]:
    io.write_parquet(root / "train.parquet", train, schema=SCHEMA)
    io.write_parquet(root / "val.parquet", val, schema=SCHEMA)
    return root / "train.parquet", root / "val.parquet"


def config(method: str, *, lr: float = 1e-2, batch_size: int = 8, **train) -> RunConfig:
    t = {"max_steps": 8, "eval_steps": 4, "logging_steps": 2, "patience": 0,
         "warmup_ratio": 0.0, **train}
    return RunConfig(top=TopParams(method=method, lr=lr, epochs=1, batch_size=batch_size, seed=0),
                     train=TrainParams(**t), lora=LoraParams(r=8),
                     prompt=PromptParams(num_virtual_tokens=4))


def run(tmp_path: Path, base: Path, cfg: RunConfig, train=None, val=None) -> dict:
    paths = write_splits(tmp_path, train if train is not None else make_rows(64, 0),
                         val if val is not None else make_rows(16, 1))
    return train_model(train_path=paths[0], val_path=paths[1], base_dir=base,
                       out_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpt",
                       live_dir=tmp_path / "live", cfg=cfg)


def val_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """The Trainer's eval loss: per-batch mean loss, averaged weighted by batch size."""
    import torch

    collate, total, n = PaddingCollator(pad_id), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            total += model(**collate(batch)).loss.item() * len(batch)
            n += len(batch)
    return total / n


# --------------------------------------------------------------------------- fast units
def test_collator_pads_ids_labels_and_mask():
    out = PaddingCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                     {"input_ids": [8], "labels": [8]}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PaddingCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])[
        "input_ids"].shape == (1, 8)


def test_sizes_name_the_param():
    with pytest.raises(TrainSetupError, match=r"^batch_size: 16 x train.grad_accum 2 = 32 .* only "
                                              r"20 rows; use batch_size <= 10"):
        check_sizes(20, 5, 16, 2)
    with pytest.raises(TrainSetupError, match=r"val.parquet: the val split is empty; raise "
                                              r"split.val_ratio"):
        check_sizes(20, 0, 4, 1, ("train.parquet", "val.parquet"))
    check_sizes(32, 1, 16, 2)  # exactly one optimizer step fits


def test_rows_checked_with_file_and_row():
    good = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    with pytest.raises(TrainSetupError, match=r"t.parquet: row 2: token id 999 outside"):
        check_rows([good, {"input_ids": [999], "labels": [999]}], "t.parquet", vocab_size=500,
                   max_positions=64)
    with pytest.raises(TrainSetupError, match=r"row 1: input_ids \(3\) and labels \(2\)"):
        check_rows([{"input_ids": [1, 2, 3], "labels": [2, 3]}], "t", vocab_size=9, max_positions=9)
    with pytest.raises(TrainSetupError, match=r"row 1: no label tokens"):
        check_rows([{"input_ids": [1, 2], "labels": [-100, -100]}], "t", vocab_size=9,
                   max_positions=9)
    with pytest.raises(TrainSetupError, match=r"3 tokens \+ prompt.num_virtual_tokens 8 exceed"):
        check_rows([good], "t", vocab_size=9, max_positions=10, extra_positions=8)


def test_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(TrainSetupError, match="train.precision: fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_training_arguments_follow_params(tmp_path):
    cfg = config("full", lr=3e-4, batch_size=4, scheduler="linear", warmup_ratio=0.1,
                 weight_decay=0.01, grad_accum=4, max_grad_norm=0.5, gradient_checkpointing=True)
    a = training_arguments(cfg, output_dir=tmp_path, device="cpu", precision="fp32")
    assert (a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (
        3e-4, 4, 4)
    assert str(a.lr_scheduler_type.value) == "linear" and a.warmup_steps == 0.1
    assert (a.weight_decay, a.max_grad_norm, a.max_steps) == (0.01, 0.5, 8)
    assert a.activation_checkpointing and not (a.bf16 or a.fp16) and a.use_cpu
    assert (a.eval_steps, a.save_steps, a.seed, a.data_seed) == (4, 4, 0, 0)
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss"
    assert a.report_to == []  # no integration auto-wired: the curves callback is ours
    assert str(a.optim.value) == "adamw_torch_fused"  # fused AdamW, named (issue 9)
    packed = training_arguments(cfg, output_dir=tmp_path, device="cpu", precision="fp32",
                                packing=True)
    assert packed.per_device_train_batch_size == 1 and packed.per_device_eval_batch_size == 4
    const = training_arguments(config("full", scheduler="constant", warmup_ratio=0.2),
                               output_dir=tmp_path, device="cpu", precision="fp32")
    assert str(const.lr_scheduler_type.value) == "constant_with_warmup"


def test_mean_logged_loss_weights_intervals_by_length():
    history = [{"loss": 4.0, "step": 1}, {"eval_loss": 9.0, "step": 1}, {"loss": 2.0, "step": 5},
               {"loss": 1.0, "step": 7}]
    assert mean_logged_loss(history) == pytest.approx((4 * 1 + 2 * 4 + 1 * 2) / 7)
    assert mean_logged_loss([{"eval_loss": 1.0, "step": 0}]) is None


def test_out_of_memory_advice_names_the_params():
    msg = out_of_memory_advice(config("full", batch_size=16, grad_accum=2), "full", 900, "cuda")
    assert msg.startswith("out of memory on cuda with batch_size: 16 (x train.grad_accum 2)")
    assert "batch_size: 8 with train.grad_accum: 4 (same 32 sequences" in msg
    assert "train.gradient_checkpointing: true" in msg and "longest sequence now 900" in msg
    assert "method: lora or qlora" in msg
    one = out_of_memory_advice(config("lora", batch_size=1, gradient_checkpointing=True), "lora",
                               50, "cuda")
    assert "batch_size is already 1" in one and "gradient_checkpointing" not in one
    assert "method:" not in one
    assert "train.packing: true" in msg and "train.loss_impl: chunked" in msg
    packed = out_of_memory_advice(config("full", tokens_per_batch=16384), "full", 2048, "cuda",
                                  packing=True, loss_impl="liger")
    assert packed.startswith("out of memory on cuda with train.tokens_per_batch: 16384 (x "
                             "train.grad_accum 1)")
    assert "train.tokens_per_batch: 8192 with train.grad_accum: 2" in packed
    assert "train.gradient_checkpointing: true" in packed and "loss_impl" not in packed


def test_resume_point_clears_other_configs_and_partial_checkpoints(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint-4").mkdir(parents=True)
    io.write_json(ckpt / RUN_STATE_FILE, {"fingerprint": "old", "status": "running"})
    assert resume_point(ckpt, "new") == (None, {"fingerprint": "new", "status": "running",
                                                "initial_val_loss": None})
    assert "belong to another run config" in caplog.text
    assert not (ckpt / "checkpoint-4").exists()
    for step, complete in ((4, True), (8, True), (12, False)):
        d = ckpt / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        if complete:
            io.write_json(d / COUNTERS_FILE, {"label_tokens_seen": step})
    path, state = resume_point(ckpt, "new")
    assert path == ckpt / "checkpoint-8" and state["fingerprint"] == "new"
    assert not (ckpt / "checkpoint-12").exists()  # half-written: removed
    # a finished run leaves only its run state: another config starts fresh without a warning
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    io.write_json(ckpt / RUN_STATE_FILE, {"fingerprint": "done", "status": "finished"})
    caplog.clear()
    assert resume_point(ckpt, "next")[0] is None and not caplog.records


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "prompt_tuning",
                                    "prefix_tuning"])
def test_every_method_learns_and_reloads(tmp_path, tiny_base_dir, method):
    lr = 0.3 if method in ("prompt_tuning", "prefix_tuning") else 1e-2
    m = run(tmp_path, tiny_base_dir, config(method, lr=lr))
    assert m["method"] == method and m["train_steps"] == 8 and not m["stopped_early"]
    assert m["best_val_loss"] < m["initial_val_loss"] - 0.05, m
    assert m["label_tokens_seen"] == 8 * 8 * 12  # steps x batch x labelled tokens per row
    assert m["tokens_seen"] == 8 * 8 * 16
    assert m["peak_memory_kind"] == "process_peak_rss" and m["peak_memory_mb"] > 0
    # which paths ran: CPU defaults are padding-free batches (sdpa per sample; soft prompts
    # unpacked, sdpa), chunked loss where the head allows it
    soft = method in ("prompt_tuning", "prefix_tuning")
    assert (m["packing"], m["attention"], m["optim"], m["torch_compile"]) == (
        not soft, "sdpa" if soft else "sdpa per sample", "adamw_torch_fused", False)
    assert m["packing_style"] == ("off" if soft else "padding_free") and m["mode"] == "portable"
    assert m["loss_impl"] == ("stock" if soft else "chunked"), m["loss_note"]
    assert m["fast_path_fallbacks"] == {}  # every fast path that was tried ran
    share = m["trainable_share"]
    assert {"full": share == 1.0, "freeze": 0 < share < 1, "lora": 0 < share < 0.5,
            "qlora": 0 < share < 0.5, "prompt_tuning": 0 < share < 0.05,
            "prefix_tuning": 0 < share < 0.05}[method]

    manifest = io.read_json(tmp_path / "out" / "reprotune_train.json")
    adapter = method not in ("full", "freeze")
    assert manifest["kind"] == ("adapter" if adapter else "full")
    assert manifest["base_dir"] == str(tiny_base_dir) and manifest["enable_thinking"] is False
    files = {p.name for p in (tmp_path / "out").iterdir()}
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    assert {weights, "tokenizer.json", "chat_template.jinja"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)

    # the evaluate stage's way in; the reloaded model is the best checkpoint
    model, tokenizer, man = load_finetuned(tmp_path / "out")
    assert man == manifest and tokenizer.chat_template
    got = val_loss(model, make_rows(16, 1), 8, tokenizer.pad_token_id)
    assert got == pytest.approx(m["best_val_loss"], abs=2e-3 if method == "qlora" else 1e-4)

    # finished: checkpoints gone, run state says so; curves written for dvc plots
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))
    assert io.read_json(tmp_path / "ckpt" / RUN_STATE_FILE)["status"] == "finished"
    tsvs = tmp_path / "live" / "plots" / "metrics"
    assert {p.name for p in tsvs.iterdir()} == LIVE_TSVS
    val_rows = (tsvs / "val_loss.tsv").read_text().splitlines()
    assert val_rows[0] == "step\tval_loss"
    assert [int(r.split("\t")[0]) for r in val_rows[1:]] == [0, 4, 8]  # before + every 4 steps
    assert not (tmp_path / "live" / "dvc.yaml").exists()


def test_early_stopping_restores_the_best_checkpoint(tmp_path, tiny_base_dir):
    # train on counting up, validate on counting down: val loss soon gets worse
    cfg = config("full", lr=2e-2, max_steps=60, eval_steps=2, patience=2)
    m = run(tmp_path, tiny_base_dir, cfg, val=make_rows(16, 1, down=True))
    assert m["stopped_early"] and m["train_steps"] < 60
    assert m["train_steps"] == m["best_step"] + 2 * 2  # patience evaluations after the best
    model, tokenizer, _ = load_finetuned(tmp_path / "out")
    got = val_loss(model, make_rows(16, 1, down=True), 8, tokenizer.pad_token_id)
    assert got == pytest.approx(m["best_val_loss"], abs=1e-4)


def test_loop_options_schedule_accumulation_and_checkpointing(tmp_path, tiny_base_dir,
                                                              monkeypatch):
    import tempfile

    from transformers import TrainerCallback

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: list[str] = []

    class ListScratch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.extend(sorted(p.name for p in scratch.rglob("*.arrow")))

    cfg = config("full", lr=1e-2, scheduler="linear", warmup_ratio=0.25, weight_decay=0.1,
                 grad_accum=2, max_grad_norm=0.5, gradient_checkpointing=True, logging_steps=1)
    paths = write_splits(tmp_path, make_rows(64, 0), make_rows(16, 1))
    m = train_model(train_path=paths[0], val_path=paths[1], base_dir=tiny_base_dir,
                    out_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpt",
                    live_dir=tmp_path / "live", cfg=cfg, callbacks=[ListScratch()])
    # the splits were read from memory-mapped Arrow copies, removed when training ended
    assert [n.split("-")[0] for n in seen] == ["train", "val"] and not list(scratch.iterdir())
    assert m["train_steps"] == 8 and m["best_val_loss"] < m["initial_val_loss"] - 0.05, m
    assert m["tokens_seen"] == 8 * 2 * 8 * 16  # steps x grad_accum x batch x tokens per row
    lrs = [float(r.split("\t")[1]) for r in
           (tmp_path / "live/plots/metrics/learning_rate.tsv").read_text().splitlines()[1:]]
    # 2 warm-up steps (25 % of 8) from 0 to lr, then a straight line down (cosine would bend)
    assert lrs[:3] == pytest.approx([0.0, 5e-3, 1e-2])
    drops = [a - b for a, b in zip(lrs[2:-1], lrs[3:], strict=True)]
    assert len(drops) == 5 and drops == pytest.approx([1e-2 / 6] * 5)


def test_eval_indices_spread_a_capped_val_pass_over_the_split():
    assert eval_indices(5, 0).tolist() == eval_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert eval_indices(16, 5).tolist() == [0, 3, 6, 9, 12]
    picked = eval_indices(206, 64)
    assert len(set(picked.tolist())) == 64 and picked[0] == 0 and picked[-1] == 202
    assert (picked < 103).sum() == 32  # both halves of the split (e.g. two inputs) equally


def test_eval_rows_caps_every_evaluation_to_the_same_rows(tmp_path, tiny_base_dir):
    """train.eval_rows: the val loss before step 1, early stopping and the restored best
    checkpoint all use the same 5 of the 16 val rows (about 3 s)."""
    from transformers import AutoModelForCausalLM

    val = make_rows(16, 1, down=True)
    picked = [val[i] for i in (0, 3, 6, 9, 12)]
    cfg = config("full", lr=2e-2, max_steps=60, eval_steps=2, patience=2, eval_rows=5)
    m = run(tmp_path, tiny_base_dir, cfg, val=val)
    assert (m["val_rows"], m["val_rows_evaluated"]) == (16, 5)
    assert m["stopped_early"] and m["train_steps"] == m["best_step"] + 2 * 2
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    model, tokenizer, _ = load_finetuned(tmp_path / "out")
    pad = tokenizer.pad_token_id
    assert val_loss(base, picked, 8, pad) == pytest.approx(m["initial_val_loss"], abs=1e-4)
    assert val_loss(model, picked, 8, pad) == pytest.approx(m["best_val_loss"], abs=1e-4)
    assert val_loss(model, val, 8, pad) != pytest.approx(m["best_val_loss"], abs=1e-3)


def test_a_finished_run_leaves_nothing_to_resume_or_warn_about(tmp_path, tiny_base_dir, caplog):
    """After a finished run, a rerun with another param starts fresh, silently (about 4 s)."""
    run(tmp_path, tiny_base_dir, config("full"))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [RUN_STATE_FILE]
    caplog.clear()
    with caplog.at_level("INFO", logger="reprotune"):
        m = run(tmp_path, tiny_base_dir, config("full", lr=5e-3))
    assert m["resumed_from_step"] == 0 and "resuming" not in caplog.text
    assert not [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name.startswith("reprotune")]
    assert io.read_json(tmp_path / "ckpt" / RUN_STATE_FILE)["status"] == "finished"


def test_bad_param_leaves_an_interrupted_runs_checkpoints(tmp_path, tiny_base_dir):
    ckpt = tmp_path / "ckpt" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    io.write_json(tmp_path / "ckpt" / RUN_STATE_FILE, {"fingerprint": "x", "status": "running"})
    bad = RunConfig(top=TopParams(method="lora"), lora=LoraParams(target_modules=["qproj"]))
    with pytest.raises(TrainSetupError, match=r"lora.target_modules: 'qproj' matches no module"):
        run(tmp_path, tiny_base_dir, bad)
    assert ckpt.is_dir()  # fix the typo and rerun: the interrupted run can still resume


def test_bad_input_fails_before_training(tmp_path, tiny_base_dir):
    with pytest.raises(TrainSetupError, match="split.val_ratio"):
        run(tmp_path, tiny_base_dir, config("full"), val=[])
    with pytest.raises(TrainSetupError, match=r"^batch_size: 128 x"):
        run(tmp_path, tiny_base_dir, config("full", batch_size=128))
    bad = RunConfig(top=TopParams(method="lora"), lora=LoraParams(target_modules=["qproj"]))
    with pytest.raises(TrainSetupError, match=r"lora.target_modules: 'qproj' matches no module"):
        run(tmp_path, tiny_base_dir, bad)
    with pytest.raises(TrainSetupError, match=r"train.parquet: row 1: token id 100000 outside"):
        run(tmp_path, tiny_base_dir, config("full"),
            train=[{"input_ids": [100000, 5], "labels": [-100, 5]}] * 8)
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


def test_corrupt_base_and_divergence_stop_with_one_line(tmp_path, tiny_base_dir):
    import shutil

    from conftest import set_nan_weight

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    set_nan_weight(base)
    with pytest.raises(TrainSetupError, match=rf"^{base}: the base model's validation loss is nan"):
        run(tmp_path / "a", base, config("full"))
    with pytest.raises(TrainSetupError, match=r"^training diverged: the loss is not finite at step"
                                              r" 4 \(val loss nan\); lower lr \(1e\+30\)"):
        run(tmp_path / "b", tiny_base_dir, config("full", lr=1e30, max_grad_norm=0.0,
                                                   logging_steps=1))


# --------------------------------------------------------------------------- resume
PARAMS = """method: full
lr: 0.01
epochs: 1
batch_size: 8
seed: 0
train: {max_steps: 60, eval_steps: 10, logging_steps: 5, patience: 0, warmup_ratio: 0.0}
"""


def _train_cmd(repo_root: Path, tmp: Path, base: Path) -> list[str]:
    return [sys.executable, str(repo_root / "stages" / "train.py"), "--train", "train.parquet",
            "--val", "val.parquet", "--base", str(base), "--out", "out", "--checkpoints", "ckpt",
            "--live-dir", "live", "--metrics", "train.json"]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_base_dir, repo_root, packing):
    write_splits(tmp_path, make_rows(64, 0, answer_len=40), make_rows(16, 1, answer_len=40))
    # packed: 352-token packs hold exactly 8 of the 44-token rows, so the counts match
    params = PARAMS.replace("warmup_ratio: 0.0}", "warmup_ratio: 0.0, packing: true, "
                            "tokens_per_batch: 352}") if packing else PARAMS
    (tmp_path / "params.yaml").write_text(params)
    cmd = _train_cmd(repo_root, tmp_path, tiny_base_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "ckpt" / "checkpoint-10"
    deadline = time.time() + 120
    while not (ckpt / COUNTERS_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the first run finished before it was killed"
    assert (ckpt / COUNTERS_FILE).exists() and not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "live")  # what DVC does to the curves before a rerun

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint ckpt/checkpoint-" in second.stderr
    m = io.read_json(tmp_path / "train.json")
    assert m["resumed_from_step"] >= 10 and m["train_steps"] == 60
    assert m["packing_style"] == ("packs" if packing else "padding_free")  # the CPU default
    assert m["tokens_seen"] == 60 * 8 * 44  # counters continued across the kill
    assert m["label_tokens_seen"] == 60 * 8 * 40
    steps = [int(r.split("\t")[0]) for r in
             (tmp_path / "live/plots/metrics/val_loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(0, 61, 10))  # no duplicate points from the killed run
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))

    # the same run without the kill (fresh checkpoint dir) ends where the resumed one did
    straight = tmp_path / "straight"
    straight.mkdir()
    for name in ("train.parquet", "val.parquet", "params.yaml"):
        (straight / name).write_bytes((tmp_path / name).read_bytes())
    third = subprocess.run(cmd, cwd=straight, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    s = io.read_json(straight / "train.json")
    assert s["resumed_from_step"] == 0 and s["train_steps"] == 60
    for key in ("best_val_loss", "best_step", "final_train_loss", "mean_train_loss",
                "tokens_seen", "label_tokens_seen", "initial_val_loss"):
        assert m[key] == s[key], key

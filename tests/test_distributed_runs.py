"""Two training processes (`accelerate launch`, gloo on CPU) through the train stage itself.

* DDP with global batch 8 (2 x 4) follows the loss curve of one process with batch 8;
* packed, the packs are shared by the ranks: 2 processes x 1 pack match 1 process x 2 packs;
* a dying rank takes the run down at once with one line naming it; the rerun resumes from
  the last checkpoint and ends exactly where an uninterrupted two-process run ends;
* FSDP and DeepSpeed ZeRO need CUDA (accelerate runs them on GPUs only): skipped without two.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import config, make_rows, val_loss, write_splits

from reprotune import io
from reprotune.train.loading import load_finetuned
from reprotune.train.training import COUNTERS_FILE, RUN_STATE_FILE, train_model

ROOT = Path(__file__).resolve().parents[1]
TSVS = ("train_loss", "val_loss", "grad_norm", "learning_rate")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def stage_cmd() -> list[str]:
    return [sys.executable, str(ROOT / "stages" / "train.py"), "--train", "train.parquet",
            "--val", "val.parquet", "--base", "base", "--out", "out", "--checkpoints", "ckpt",
            "--live-dir", "live", "--metrics", "train.json"]


def workdir(root: Path, base: Path, params: str, train: list, val: list) -> Path:
    """A folder laid out like the repository for one stage run (params, configs, splits)."""
    root.mkdir(parents=True)
    write_splits(root, train, val)
    (root / "params.yaml").write_text(params)
    (root / "configs").symlink_to(ROOT / "configs")
    (root / "base").symlink_to(base)
    return root


def run_stage(cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(stage_cmd(), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def curves(live: Path) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for name in TSVS:
        lines = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
        out[name] = [(int(a), float(b)) for a, b in (ln.split("\t") for ln in lines)]
    return out


def params(batch_size: int, processes: int, method: str = "full", **train) -> str:
    """params.yaml of the runs here (LoRA rank 8, as test_training's ``config``)."""
    t = {"max_steps": 8, "eval_steps": 4, "logging_steps": 1, "patience": 0,
         "warmup_ratio": 0.0, **train}
    if processes > 1:
        t.update(launcher="accelerate", num_processes=processes)
    body = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in t.items())
    return (f"method: {method}\nlr: 0.01\nepochs: 1\nbatch_size: {batch_size}\nseed: 0\n"
            f"train: {{{body}}}\nlora: {{r: 8}}\n")


def assert_same_curves(two: Path, one: Path, rel: float) -> None:
    """The same steps and values within ``rel`` (relative) in every curve."""
    a, b = curves(two), curves(one)
    for name in TSVS:
        assert [s for s, _ in a[name]] == [s for s, _ in b[name]], name
        assert [v for _, v in a[name]] == pytest.approx([v for _, v in b[name]], rel=rel), name


# --------------------------------------------------------------------------- DDP
# full is not marked slow (about 20 s): it guards the data-parallel path itself
@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_base_dir, method):
    train, val = make_rows(64, 0), make_rows(16, 1)
    two = workdir(tmp_path / "two", tiny_base_dir, params(4, 2, method), train, val)
    done = run_stage(two)
    # one Arrow copy of the splits on the machine: rank 1 maps rank 0's files
    assert done.stderr.count("memory-mapped from") == 2  # train and val, by rank 0
    assert "the 2 ranks on this machine map these copies" in done.stderr
    # one process, the same global batch (8) and seed, the stock loss (the two processes
    # run the chunked one: equal within fp32 rounding); in-process, as the other tests run
    one = tmp_path / "one"
    one.mkdir()
    paths = write_splits(one, train, val)
    single = train_model(train_path=paths[0], val_path=paths[1], base_dir=tiny_base_dir,
                         out_dir=one / "out", checkpoints_dir=one / "ckpt",
                         live_dir=one / "live",
                         cfg=config(method, batch_size=8, loss_impl="stock", logging_steps=1))
    m = io.read_json(two / "train.json")
    # fp32 on CPU: two ranks sum the same gradients in another order; measured: losses within
    # 5e-7, grad norms within 4e-5 (relative)
    assert_same_curves(two / "live", one / "live", 5e-4)
    assert m["best_val_loss"] == pytest.approx(single["best_val_loss"], abs=1e-4)
    assert m["loss_impl"] == "chunked"  # the lean loss under DDP (inside the wrapped forward)
    assert m["distributed"] == {"num_processes": 2, "strategy": "ddp", "backend": "gloo",
                                "global_batch": 8, "global_batch_unit": "sequences"}
    assert (m["tokens_seen"], m["label_tokens_seen"]) == (8 * 8 * 16, 8 * 8 * 12)
    assert (m["tokens_seen"], m["label_tokens_seen"]) == (single["tokens_seen"],
                                                          single["label_tokens_seen"])
    assert "distributed" not in single  # a one-process run's metrics are unchanged
    # tokens/s is over both ranks: the global token count over the training time
    timing = io.read_json(two / "metrics" / "timing" / "train.json")
    assert timing["tokens_per_s"] > 0 and "tokens_per_s" not in m
    # rank 0 alone wrote: one model folder, the curves once, no leftover checkpoints
    assert {p.name for p in (two / "out").iterdir()} == {p.name for p in (one / "out").iterdir()} | {
        "reprotune_lineage.json"}
    assert [p.name for p in (two / "ckpt").iterdir()] == [RUN_STATE_FILE]
    lineage = io.read_json(two / "out" / "reprotune_lineage.json")
    assert lineage["params"]["launch"]["num_processes"] == 2
    # the folder loads as a one-process one does, and scores its best val loss
    # (an adapter's manifest names its base as the stage saw it: "base", relative to `two`)
    model, tok, manifest = load_finetuned(two / "out", base_dir=tiny_base_dir)
    assert manifest["kind"] == ("full" if method == "full" else "adapter")
    assert val_loss(model, val, 8, tok.pad_token_id) == pytest.approx(m["best_val_loss"], abs=1e-4)


@pytest.mark.slow  # > 25 s: make test runs it, make test-fast does not
def test_the_lean_loss_under_ddp_equals_the_stock_loss(tmp_path, tiny_base_dir):
    """Two gloo processes with the chunked loss (computed inside the DDP-wrapped forward) and
    with the model's own loss: the same curves, so gradients were synchronised either way."""
    train, val = make_rows(64, 0), make_rows(16, 1)
    runs = {}
    for impl in ("chunked", "stock"):
        cwd = workdir(tmp_path / impl, tiny_base_dir, params(4, 2, loss_impl=impl), train, val)
        run_stage(cwd)
        runs[impl] = cwd
    lean, stock = (io.read_json(runs[k] / "train.json") for k in ("chunked", "stock"))
    assert (lean["loss_impl"], stock["loss_impl"]) == ("chunked", "stock")
    assert lean["distributed"]["num_processes"] == 2 and lean["train_steps"] == 8
    # measured: train losses within 1e-6; grad norms within 1.5e-4 (relative) at step 7:
    # at lr 1e-2 this tiny model amplifies fp32 rounding (one process, padded or padding-free,
    # before and after padding-free batches existed: chunked vs stock 1.0e-4 at step 7)
    assert_same_curves(runs["chunked"] / "live", runs["stock"] / "live", 5e-4)
    assert lean["best_val_loss"] == pytest.approx(stock["best_val_loss"], abs=1e-5)
    assert lean["best_val_loss"] < lean["initial_val_loss"] - 0.05  # it learned


def test_a_bad_row_stops_every_rank_at_once_with_rank_0s_message(tmp_path, tiny_base_dir):
    """Rank 0 alone checks the rows; its error reaches rank 1 at once (not after
    train.collective_timeout_s) and both exit naming the file and the row."""
    train = make_rows(16, 0)
    train[5]["input_ids"][2] = 100_000  # outside the tiny vocabulary
    cwd = workdir(tmp_path / "bad", tiny_base_dir, params(4, 2) + "", train, make_rows(8, 1))
    t0 = time.perf_counter()
    done = subprocess.run(stage_cmd(), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert time.perf_counter() - t0 < 120  # the collective timeout is 600 s
    msg = "train.parquet: row 6: token id 100000 outside the model's vocab"
    assert done.stderr.count(msg) >= 2, done.stderr[-3000:]  # rank 0 and rank 1 both say it


@pytest.mark.slow
def test_packed_ranks_share_the_packs(tmp_path, tiny_base_dir):
    train, val = make_rows(64, 0), make_rows(16, 1)
    # 8 rows of 16 tokens a pack: 8 packs; the stock loss on both sides (see above)
    packed = {"packing": True, "tokens_per_batch": 128, "loss_impl": "stock"}
    two = workdir(tmp_path / "two", tiny_base_dir, params(8, 2, **packed), train, val)
    one = workdir(tmp_path / "one", tiny_base_dir, params(8, 1, grad_accum=2, **packed),
                  train, val)
    run_stage(two)
    run_stage(one)
    a, b = io.read_json(two / "train.json"), io.read_json(one / "train.json")
    assert a["packs"] == b["packs"] == 8 and a["packing"] is b["packing"] is True
    assert a["distributed"]["global_batch"] == 2 and a["distributed"]["global_batch_unit"] == "packs"
    # every sample once per epoch on one rank or the other: the same tokens as one process
    assert (a["tokens_seen"], a["label_tokens_seen"]) == (b["tokens_seen"], b["label_tokens_seen"])
    assert a["epochs_done"] == b["epochs_done"] == 2.0
    assert_same_curves(two / "live", one / "live", 5e-4)


# --------------------------------------------------------------------------- failure, resume
RESUME = {"max_steps": 60, "eval_steps": 10, "logging_steps": 5}


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.slow
def test_a_dying_rank_stops_the_run_and_the_rerun_resumes(tmp_path, tiny_base_dir):
    train, val = make_rows(64, 0, answer_len=40), make_rows(16, 1, answer_len=40)
    text = params(4, 2, **RESUME)
    run = workdir(tmp_path / "run", tiny_base_dir, text, train, val)
    launcher = subprocess.Popen(stage_cmd(), cwd=run, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = run / "ckpt" / "checkpoint-10"
    deadline = time.time() + 180
    while not (ckpt / COUNTERS_FILE).exists() and launcher.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(launcher, 1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    _, err = launcher.communicate(timeout=120)
    # the launcher notices the dead rank and stops the other one: no hang until a timeout
    assert launcher.returncode == 1 and time.time() - killed_at < 30
    assert err.strip().splitlines()[-1] == (
        f"train: training process rank 1 of 2 (pid {victim}) was killed by signal SIGKILL; the "
        f"launcher stopped the other rank(s) (see rank 1's error above, if any); rerun to "
        f"resume from the last checkpoint")
    assert (ckpt / COUNTERS_FILE).exists() and not (run / "out").exists()
    assert not (run / "train.json").exists()

    resumed = run_stage(run)
    assert "resuming from checkpoint ckpt/checkpoint-" in resumed.stderr
    m = io.read_json(run / "train.json")
    assert m["resumed_from_step"] >= 10 and m["train_steps"] == 60
    assert (m["tokens_seen"], m["label_tokens_seen"]) == (60 * 8 * 44, 60 * 8 * 40)
    steps = [s for s, _ in curves(run / "live")["val_loss"]]
    assert steps == list(range(0, 61, 10))  # no duplicate points from the killed run
    assert not list((run / "ckpt").glob("checkpoint-*"))

    # the same two-process run without the kill ends where the resumed one did
    straight = workdir(tmp_path / "straight", tiny_base_dir, text, train, val)
    run_stage(straight)
    s = io.read_json(straight / "train.json")
    assert s["resumed_from_step"] == 0
    for key in ("best_val_loss", "best_step", "final_train_loss", "mean_train_loss",
                "tokens_seen", "label_tokens_seen", "initial_val_loss", "train_steps"):
        assert m[key] == s[key], key


# --------------------------------------------------------------------------- CUDA only
@pytest.mark.slow
@pytest.mark.skipif(_gpus() < 2, reason="FSDP and DeepSpeed run on CUDA GPUs only: needs 2")
@pytest.mark.parametrize("config_name", ["fsdp", "zero2", "zero3"])
def test_sharded_strategies_save_a_model_that_scores_like_ddp(tmp_path, tiny_base_dir,
                                                              config_name):
    if config_name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    train, val = make_rows(64, 0), make_rows(16, 1)
    precision = "bf16" if config_name.startswith("zero") else "fp32"
    text = params(4, 2, precision=precision, loss_impl="stock")
    ddp = workdir(tmp_path / "ddp", tiny_base_dir, text, train, val)
    run_stage(ddp)
    other = workdir(tmp_path / config_name, tiny_base_dir, text.replace(
        "}", f", accelerate_config: configs/accelerate/{config_name}.yaml}}", 1), train, val)
    run_stage(other)
    a, b = io.read_json(ddp / "train.json"), io.read_json(other / "train.json")
    assert b["distributed"]["strategy"] == ("fsdp" if config_name == "fsdp" else "deepspeed")
    assert (other / "out" / "model.safetensors").is_file()  # consolidated, one file
    model, tok, _ = load_finetuned(other / "out")
    got = val_loss(model, val, 8, tok.pad_token_id)
    tol = 1e-3 if precision == "fp32" else 5e-2
    assert got == pytest.approx(b["best_val_loss"], abs=tol)
    assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], abs=tol)

"""train.launcher: accelerate: params, shipped configs, pre-launch checks, packs over ranks.

The multi-process runs themselves (two processes on gloo) are in test_distributed_runs.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune.params import ParamsError, TrainParams, build
from reprotune.train import launch
from reprotune.train.methods import TrainSetupError
from reprotune.train.packing import balance_packs, pack_rows, packed_dataset
from reprotune.train.training import LAUNCH_KEYS, RunConfig, check_sizes, run_fingerprint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


# --------------------------------------------------------------------------- params
def test_launch_params_are_checked_on_load():
    t = build(TrainParams, {}, "train")
    assert (t.launcher, t.num_processes, t.accelerate_config, t.collective_timeout_s) == (
        "python", 1, "configs/accelerate/ddp.yaml", 600)
    with pytest.raises(ParamsError, match=r"^train.num_processes: 2 processes need "
                                          r"train.launcher: accelerate"):
        build(TrainParams, {"num_processes": 2}, "train")
    for bad in ("/etc/ddp.yaml", "ddp.yaml", "configs/../ddp.yaml", "configs/ddp.json"):
        with pytest.raises(ParamsError, match=r"^train.accelerate_config: .* must be a \.yaml file "
                                              r"under configs/"):
            build(TrainParams, {"launcher": "accelerate", "accelerate_config": bad}, "train")
    with pytest.raises(ParamsError, match=r"^train.launcher: 'torchrun' is not one of"):
        build(TrainParams, {"launcher": "torchrun"}, "train")
    build(TrainParams, {"launcher": "accelerate", "num_processes": 8,
                        "accelerate_config": "configs/accelerate/fsdp.yaml"}, "train")


def test_one_process_params_record_no_launch_keys():
    """A python-launched run's fingerprint and lineage params are what they were before the
    launch keys existed, so its model folder stays byte-identical."""
    plain = RunConfig().relevant()
    assert "launch" not in plain and not set(LAUNCH_KEYS) & set(plain["train"])
    launched = RunConfig(train=TrainParams(launcher="accelerate", num_processes=2)).relevant()
    assert launched["launch"] == {"launcher": "accelerate", "num_processes": 2,
                                  "accelerate_config": "configs/accelerate/ddp.yaml",
                                  "collective_timeout_s": 600}
    assert launched["train"] == plain["train"]


def test_resume_fingerprint_follows_the_launch(tmp_path, monkeypatch):
    """Checkpoints resume only with the same processes and configs (each rank saved its own
    RNG state; FSDP/ZeRO shard the files); a python run ignores the launch keys."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "accelerate").mkdir(parents=True)
    (tmp_path / "configs" / "accelerate" / "ddp.yaml").write_text("distributed_type: MULTI_GPU\n")
    for name in ("t", "v", "base/w"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)

    def fp(**train) -> str:
        return run_fingerprint(RunConfig(train=TrainParams(**train)), "t", "v", "base")

    one = fp()
    assert fp(collective_timeout_s=60, accelerate_config="configs/accelerate/x.yaml") == one
    two = fp(launcher="accelerate", num_processes=2)
    assert two != one and fp(launcher="accelerate", num_processes=4) != two
    (tmp_path / "configs" / "deepspeed").mkdir()
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text("{}")
    assert fp(launcher="accelerate", num_processes=2) != two


def test_optimizer_step_must_fit_every_process():
    check_sizes(64, 8, 4, 2, processes=8)  # 4 x 2 x 8 = 64: exactly one step
    with pytest.raises(TrainSetupError, match=r"^batch_size: 4 x train.grad_accum 2 x "
                                              r"train.num_processes 8 = 64 sequences per optimizer "
                                              r"step, but the train split has only 63 rows; use "
                                              r"batch_size <= 3"):
        check_sizes(63, 8, 4, 2, processes=8)


# --------------------------------------------------------------------------- packs
def test_packs_are_balanced_over_ranks_without_dropping_or_repeating():
    lengths = [30 + (7 * i) % 50 for i in range(101)]
    packs = pack_rows(lengths, 200, seed=3)
    for n in (2, 3, 4, 8):
        balanced = balance_packs(packs, n)
        assert len(balanced) % n == 0 and len(packs) <= len(balanced) < len(packs) + n
        flat = [i for p in balanced for i in p]
        assert flat == [i for p in packs for i in p]  # same samples, same order, once each
        assert all(p and sum(lengths[i] for i in p) <= 200 for p in balanced)
    assert balance_packs(packs, 1) == packs
    with pytest.raises(TrainSetupError, match=r"^train.num_processes: 3 packs of one sample each "
                                              r"cannot be shared evenly by 2 processes"):
        balance_packs([[0], [1], [2]], 2)


def test_packed_dataset_for_several_processes():
    rows = [{"input_ids": [1] * 10, "labels": [1] * 10} for _ in range(9)]
    one = packed_dataset(rows, 30, 0)  # 3 packs of 3
    assert len(one) == 3
    two = packed_dataset(rows, 30, 0, num_processes=2)
    assert len(two) == 4 and sum(len(it["samples"]) for it in two) == 9
    with pytest.raises(TrainSetupError, match=r"^train.grad_accum: 2 packs per optimizer step on "
                                              r"each of train.num_processes 2, but the train split "
                                              r"fills only 3 pack\(s\)"):
        packed_dataset(rows, 30, 0, grad_accum=2, num_processes=2)


# --------------------------------------------------------------------------- configs
def test_shipped_accelerate_configs_load_with_accelerate():
    kinds = {p.stem: launch.kind_of(launch.read_config(p)) for p in CONFIGS}
    assert kinds == {"ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed",
                     "zero2_offload": "deepspeed"}


def test_fsdp_config_is_full_shard_layer_wrap_sharded_checkpoints(tiny_base_dir):
    fsdp = launch.read_config(ROOT / "configs/accelerate/fsdp.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    # the wrap class is the decoder layer of the (tiny, Qwen3-architecture) base
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in launch.layer_classes(tiny_base_dir)


def test_deepspeed_configs_are_zero2_zero3_and_offload_bf16():
    ds = {p.stem: launch.deepspeed_json(launch.read_config(p)) for p in CONFIGS
          if launch.kind_of(launch.read_config(p)) == "deepspeed"}
    assert {k: v["zero_optimization"]["stage"] for k, v in ds.items()} == {
        "zero2": 2, "zero3": 3, "zero2_offload": 2}
    for name, cfg in ds.items():
        assert launch.read_config(ROOT / f"configs/accelerate/{name}.yaml").mixed_precision == "bf16"
        assert cfg["bf16"] == {"enabled": "auto"}  # filled from train.precision by the Trainer
        assert cfg["gradient_clipping"] == "auto" and cfg["train_batch_size"] == "auto"
    assert ds["zero3"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = ds["zero2_offload"]
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (off["train_micro_batch_size_per_gpu"], off["gradient_accumulation_steps"]) == (8, 4)
    assert ds["zero2"]["train_micro_batch_size_per_gpu"] == "auto"
    if HAS_DEEPSPEED:  # DeepSpeed's own schema, where it is installed
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        for cfg in ds.values():
            DeepSpeedZeroConfig(**cfg["zero_optimization"])


# --------------------------------------------------------------------------- pre-launch checks
def _plan(base: Path, batch_size: int = 8, method: str = "full", packing: bool = False,
          **train):
    return launch.preflight(TrainParams(launcher="accelerate", **train), batch_size=batch_size,
                            method=method, packing=packing, base_dir=base)


def test_preflight_names_the_param(tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' own paths are relative to the repository root
    have, what = launch.available_devices()
    with pytest.raises(TrainSetupError, match=rf"^train.num_processes: {have + 1} processes, but "
                                              rf"this machine has {have} "):
        _plan(tiny_base_dir, num_processes=have + 1)
    with pytest.raises(TrainSetupError, match=r"configs/accelerate/dpp.yaml: not found; shipped "
                                              r"configs: configs/accelerate/ddp.yaml"):
        _plan(tiny_base_dir, accelerate_config="configs/accelerate/dpp.yaml")
    bad = tmp_path / "fsdp_llama.yaml"
    bad.write_text((ROOT / "configs/accelerate/fsdp.yaml").read_text().replace(
        "Qwen3DecoderLayer", "LlamaDecoderLayer"))
    with pytest.raises(TrainSetupError, match=rf"^train.accelerate_config: {bad} wraps "
                                              rf"LlamaDecoderLayer, which {tiny_base_dir} does not "
                                              rf"have; its layer classes: Qwen3DecoderLayer"):
        _plan(tiny_base_dir, accelerate_config=str(bad))
    with pytest.raises(TrainSetupError, match=r"^batch_size: 16, but configs/accelerate/"
                                              r"zero2_offload.yaml \(its DeepSpeed JSON\) fixes "
                                              r"train_micro_batch_size_per_gpu at 8"):
        _plan(tiny_base_dir, batch_size=16, grad_accum=4,
              accelerate_config="configs/accelerate/zero2_offload.yaml")
    with pytest.raises(TrainSetupError, match=r"^train.grad_accum: 1, but .* fixes "
                                              r"gradient_accumulation_steps at 4"):
        _plan(tiny_base_dir, accelerate_config="configs/accelerate/zero2_offload.yaml")
    with pytest.raises(TrainSetupError, match=r"^method: qlora cannot be sharded by FSDP"):
        _plan(tiny_base_dir, method="qlora", accelerate_config="configs/accelerate/fsdp.yaml")
    assert _plan(tiny_base_dir, num_processes=1)["kind"] == "ddp"


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here")
def test_deepspeed_requested_but_not_installed(tiny_base_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(TrainSetupError, match=r"^train.accelerate_config: configs/accelerate/"
                                              r"zero3.yaml uses DeepSpeed, which is not installed; "
                                              r"pip install -e '.\[deepspeed\]'"):
        _plan(tiny_base_dir, accelerate_config="configs/accelerate/zero3.yaml")


def test_precision_and_device_mismatches(tiny_base_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(ROOT)
    bf16 = tmp_path / "ddp_bf16.yaml"
    bf16.write_text((ROOT / "configs/accelerate/ddp.yaml").read_text().replace(
        "mixed_precision: 'no'", "mixed_precision: bf16"))
    with pytest.raises(TrainSetupError, match=r"^train.precision: fp32 runs fp32 here, but .* "
                                              r"asks for bf16 mixed precision"):
        _plan(tiny_base_dir, precision="fp32", accelerate_config=str(bf16))
    if not torch.cuda.is_available():
        with pytest.raises(TrainSetupError, match=r"^train.accelerate_config: configs/accelerate/"
                                                  r"fsdp.yaml uses FSDP, which accelerate runs on "
                                                  r"CUDA GPUs only"):
            _plan(tiny_base_dir, accelerate_config="configs/accelerate/fsdp.yaml")


def test_launch_arguments_parse_with_accelerates_own_parser():
    from accelerate.commands.launch import launch_command_parser

    plan = {"config": "configs/accelerate/ddp.yaml", "num_processes": 2,
            "mixed_precision": "bf16"}
    args = launch_command_parser().parse_args(
        launch.launch_args(plan, "stages/train.py", ["--out", "x"], port=29999))
    assert (args.config_file, args.num_processes, args.main_process_port) == (
        "configs/accelerate/ddp.yaml", 2, 29999)
    assert (args.mixed_precision, args.training_script, args.training_script_args) == (
        "bf16", "stages/train.py", ["--out", "x"])


def test_stage_refuses_a_bad_launch_before_starting_anything(tmp_path, tiny_base_dir):
    (tmp_path / "params.yaml").write_text(
        "train: {launcher: accelerate, num_processes: 1024}\n")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    cmd = [sys.executable, str(ROOT / "stages" / "train.py"), "--train", "t.parquet", "--val",
           "v.parquet", "--base", str(tiny_base_dir), "--out", "out", "--checkpoints", "ckpt",
           "--live-dir", "live", "--metrics", "train.json"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("train: train.num_processes: 1024 processes, but this machine has ")
    assert not any((tmp_path / d).exists() for d in ("out", "ckpt", "live", "train.json"))

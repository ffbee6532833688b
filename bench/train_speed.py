"""Benchmark the train stage: tokens/s, peak memory and trainable share per method.

Builds a random-init Qwen3-0.6B-shaped base dir (no download: hidden 1024, 28 layers,
16/8 heads, head_dim 128, intermediate 3072, vocab 151936, tied embeddings; bf16
safetensors + the embedded byte-level tokenizer), writes seeded synthetic train/val splits
(fixed ``--seq-len``, prompt prefix labelled -100, a counting answer the model can learn)
and runs :func:`reprotune.train.training.train_model` -- the train stage's own code -- once per
method. Per method it records the stage's ``tokens_per_s`` (whole ``trainer.train()``,
including the final evaluation, checkpoint save and best-model reload), the median of the
median tokens/s over the logging intervals (training steps only: steady state), ``peak_memory_mb`` (CUDA
max_memory_allocated, reset per method; on CPU the process peak RSS, cumulative over the
run), trainable params/share, train time and initial/best val loss. A method that fails
(e.g. qlora where bitsandbytes cannot run) is recorded as failed and the next one runs.

On the GPU machine:

    python bench/train_speed.py --out bench/results/train_gpu_h100.json

Tiny on CPU: add e.g. ``--layers 1 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2
--head-dim 16 --vocab 512 --seq-len 32 --steps 4 --batch-size 2``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shlex
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reprotune import io  # noqa: E402
from reprotune.chat_template import template_fingerprint  # noqa: E402
from reprotune.data.demo import generate_demo  # noqa: E402
from reprotune.modeling import BASE_INFO_FILE, EOS_TOKEN, PAD_TOKEN, train_tokenizer  # noqa: E402
from reprotune.params import LoraParams, TopParams, TrainParams  # noqa: E402
from reprotune.train.training import RunConfig, train_model  # noqa: E402

MAX_POSITIONS = 40960


def build_base(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Random-init Qwen3 of the requested shape, saved in bf16 with the embedded tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = train_tokenizer(generate_demo(200, 0), min(args.vocab, 1024),
                          model_max_length=MAX_POSITIONS)
    pad, eos = tok.convert_tokens_to_ids(PAD_TOKEN), tok.convert_tokens_to_ids(EOS_TOKEN)
    shape = {"vocab_size": args.vocab, "hidden_size": args.hidden,
             "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
             "head_dim": args.head_dim, "max_position_embeddings": MAX_POSITIONS,
             "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    config = Qwen3Config(**shape, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    shape["n_params"] = sum(p.numel() for p in model.parameters())
    tok.save_pretrained(out)
    model.save_pretrained(out)
    io.write_json(out / BASE_INFO_FILE, {
        "name": "qwen3-0.6b-shape-random", "source": "bench/train_speed.py",
        "chat_template_sha256": template_fingerprint(tok.chat_template),
        "vocab_size": args.vocab, "n_params": shape["n_params"]})
    return shape


def make_rows(n: int, seq_len: int, vocab: int, rng: random.Random) -> list[dict[str, list[int]]]:
    """A random prompt (labels -100) then a counting run from a random start (labelled)."""
    prompt_len, rows = max(1, seq_len // 4), []
    for _ in range(n):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        start = rng.randrange(vocab)
        answer = [10 + (start + j) % (vocab - 10) for j in range(seq_len - prompt_len)]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * prompt_len + answer})
    return rows


def run_method(method: str, root: Path, base: Path, splits: tuple[Path, Path],
               args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cfg = RunConfig(
        top=TopParams(method=method, lr=args.lr, epochs=1, batch_size=args.batch_size,
                      seed=args.seed),
        train=TrainParams(max_steps=args.steps, eval_steps=args.steps, patience=0,
                          logging_steps=max(1, args.steps // 20), warmup_ratio=0.0),
        lora=LoraParams())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    d = root / method
    try:
        m = train_model(train_path=splits[0], val_path=splits[1], base_dir=base,
                        out_dir=d / "out", checkpoints_dir=d / "ckpt", live_dir=d / "live",
                        cfg=cfg)
    except Exception as exc:  # noqa: BLE001 - a failed method is a result, not a crash
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        gc.collect()
    keys = ("device", "precision", "tokens_per_s", "peak_memory_mb", "peak_memory_kind",
            "trainable_params", "total_params", "trainable_share", "train_time_s",
            "wall_time_s", "train_steps", "tokens_seen", "initial_val_loss", "best_val_loss",
            "torch_threads", "tokens_per_s_steady")
    out = {"status": "ok", **{k: m[k] for k in keys}}
    if m["peak_memory_kind"] == "process_peak_rss":
        out["peak_memory_note"] = "process-wide peak RSS, includes the methods run before"
    return out


def environment() -> tuple[str, dict[str, str | None]]:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in
             (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if ln.startswith("model name")] or [platform.processor()]
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU: {names[0]}, {os.cpu_count()} cores")
    versions: dict[str, str | None] = {"python": platform.python_version(),
                                       "cuda": torch.version.cuda}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return device, versions


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model-shape options of :func:`build_base` (defaults: Qwen3-0.6B)."""
    for name, default in (("layers", 28), ("hidden", 1024), ("intermediate", 3072),
                          ("heads", 16), ("kv-heads", 8), ("head-dim", 128), ("vocab", 151936)):
        ap.add_argument(f"--{name}", type=int, default=default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    add_shape_args(ap)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "bench/train_speed.py", *argv])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        root = Path(tmp)
        shape = build_base(root / "base", args)
        rng = random.Random(args.seed)
        n_train = min(args.batch_size * args.steps, 2048)
        splits = (root / "train.parquet", root / "val.parquet")
        for path, n in zip(splits, (n_train, 2 * args.batch_size), strict=True):
            io.write_parquet(path, make_rows(n, args.seq_len, args.vocab, rng))
        results = {m: run_method(m, root, root / "base", splits, args) for m in methods}
    device, versions = environment()
    print(f"device: {device}; model: {shape['n_params']:,} params")
    for m, r in results.items():
        if r["status"] != "ok":
            print(f"{m:8s} FAILED {r['reason'][:300]}")
            continue
        print(f"{m:8s} {r['tokens_per_s']} tok/s (steady {r['tokens_per_s_steady']}), peak "
              f"{r['peak_memory_mb']} MB ({r['peak_memory_kind']}), trainable "
              f"{r['trainable_params']:,} ({r['trainable_share']:.2%}), train "
              f"{r['train_time_s']} s, val loss {r['initial_val_loss']} -> {r['best_val_loss']}")
    print(f"command: {command}")
    report = {"device": device, "versions": versions, "command": command, "model_shape": shape,
              "run": {"steps": args.steps, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
                      "train_rows": n_train},
              "methods": results}
    if args.out:
        io.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

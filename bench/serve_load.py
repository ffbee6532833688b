"""Load test of `make serve`: N concurrent clients on loopback vs one-at-a-time offline generation.

Starts the server on 127.0.0.1 (ephemeral port) for ``--model`` (or uses a running one at
``--url``), then for each concurrency level in ``--clients`` runs that many client threads for
``--duration`` seconds; each client sends the fixed prompts in turn as streaming chat
completions (greedy, ``--max-tokens`` new tokens at most) with the official openai client.
A request started before the deadline runs to its end, so a level takes a little longer.
Per level it prints and records requests/s, output tokens/s, p50/p95 latency and time to
first token. After the server stops, the same prompts are generated one at a time offline
(same model, same greedy stopping, batch 1) in this process, and each level's tokens/s is
given as a ratio to that, with its p95 latency as a ratio to a single request's (the 1-client
level's p95: same prompts, same quantile) and each request's slowdown against its prompt
alone. The machine's load average goes in the result: on a shared CPU it is the
biggest factor in these numbers.

    python bench/serve_load.py --model models/merged --out bench/results/serve_load_cpu.json
    python bench/serve_load.py --model models/merged --shape qwen3-0.6b --duration 30 \
        --offline-rounds 1 --out bench/results/serve_load_cpu_0.6b.json

On a GPU machine the same command runs unchanged (the server puts nothing on CUDA itself:
set it up there with a CUDA torch build and the model on the device).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# before torch: the offline baseline runs on the server's CPU kernel path (the AVX2 pin, or
# native with REPROTUNE_NATIVE_CPU=1), so the ratios compare like with like
import reprotune  # noqa: E402, F401

PROMPTS = ["Give three tips for staying healthy.", "计算 12 加 7 等于多少？",
           "Translate 'good morning' into Chinese.", "What is the capital of France?",
           "请用一句话介绍长城。", "Write a haiku about autumn.",
           "List two prime numbers greater than 10.", "把“苹果”翻译成英文。"]
START_S = 300


# Qwen3-0.6B's published shape (its config.json); the vocabulary stays the model's own
SHAPES = {"qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}}


def shaped_copy(model_dir: str, shape: str, out: Path) -> str:
    """``model_dir`` (a merged folder) with a random-init model of ``shape`` in place of its
    weights: same tokenizer, chat template and manifests, so the server takes it as it is.

    The hub is unreachable here, so a real Qwen3-0.6B cannot be downloaded; serving cost
    depends on the shape, not on the weights' values (a random model rarely emits EOS, so
    every answer runs to --max-tokens: the lengths are even the same for every request)."""
    import shutil

    import torch
    from transformers import AutoConfig, Qwen3ForCausalLM

    src = Path(model_dir)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(out)
    # save_pretrained wrote a generation config derived from the training config (no KV
    # cache: use_cache false); the folder's own one is what the pipeline serves with
    shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"serve_load: {shape}-shaped random-init model, {n / 1e6:.0f}M params, in {out}",
          flush=True)
    return str(out)


def cpu_capability() -> str:
    """The kernel path torch runs on here (AVX2 unless REPROTUNE_NATIVE_CPU=1 lifts the pin)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def start_server(model: str, dtype: str, *,
                 adapters: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """The server as `make serve` runs it, on an ephemeral loopback port; (process, url).
    ``adapters`` (``name=folder`` items): serve those instead of ``model``."""
    import requests

    what = ["--adapters", *adapters] if adapters else ["--model", model]
    proc = subprocess.Popen([sys.executable, "-m", "reprotune.deploy.server", *what,
                             "--port", "0", "--dtype", dtype], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve()
                                                                 .parents[1] / "src")})
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", proc.stdout.readline())
    if not m:
        proc.kill()
        sys.exit(f"serve_load: the server for {model} did not start (see its message above)")
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{m.group(1)}/health", timeout=2).status_code == 200:
                return proc, m.group(1)
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"serve_load: the server for {model} was not healthy within {START_S}s")


def model_id(url: str) -> str:
    import requests

    return requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """Stream one chat completion; latency, time to first token, output tokens."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return {"latency_s": latency, "ttft_s": latency if first is None else first,
            "tokens": tokens}


def _pct(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 4) \
        if len(values) > 1 else round(values[0], 4)


def run_level(url: str, model: str, clients: int, duration: float,
              max_tokens: int) -> dict[str, Any]:
    """``clients`` threads sending PROMPTS in turn until ``duration`` seconds have passed."""
    import openai

    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def worker(k: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600,
                               max_retries=0)
        i = k
        while time.perf_counter() < deadline:
            try:
                r = one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
            except Exception as exc:  # counted, reported: a load test must not stop on one
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                results.append({**r, "prompt": i % len(PROMPTS)})
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 4),
            "output_tokens_per_s": round(tokens / wall, 3), "output_tokens": tokens,
            "latency_p50_s": _pct(lat, 50) if lat else None,
            "latency_p95_s": _pct(lat, 95) if lat else None,
            "ttft_p50_s": _pct(ttft, 50) if ttft else None,
            "ttft_p95_s": _pct(ttft, 95) if ttft else None,
            "_by_prompt": {k: [r["latency_s"] for r in results if r["prompt"] == k]
                           for k in sorted({r["prompt"] for r in results})}}


def offline_sequential(model_dir: str, max_tokens: int, rounds: int,
                       dtype: str) -> dict[str, Any]:
    """The same prompts generated one at a time in this process (no server), best round."""
    import torch

    from reprotune.deploy.served_model import load_served_model
    from reprotune.evaluate.generation import generate_ids
    from reprotune.runtime import usable_cpus

    torch.set_num_threads(usable_cpus())
    served = load_served_model(model_dir, dtype=dtype)
    ids = [served.render([{"role": "user", "content": p}]) for p in PROMPTS]
    best = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = 0
        for x in ids:
            out = generate_ids(served.model, [x], stops=served.stops,
                               pad_id=served.tokenizer.pad_token_id, max_new_tokens=max_tokens,
                               batch_size=1, progress=False)[0]
            n += len([t for t in out if t not in served.stops])
        wall = time.perf_counter() - t0
        if best is None or n / wall > best["output_tokens_per_s"]:
            best = {"requests": len(ids), "output_tokens": n, "wall_s": round(wall, 3),
                    "output_tokens_per_s": round(n / wall, 3),
                    "latency_mean_s": round(wall / len(ids), 4)}
    return {**best, "rounds": rounds, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/merged")
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--offline-rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    from reprotune.deploy.served_model import DTYPES

    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="the server's --dtype, and the offline baseline's")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="serve a random-init model of this shape with --model's tokenizer")
    args = ap.parse_args()
    shaped_from = None
    if args.shape:
        import tempfile

        shaped_from = args.model
        args.model = shaped_copy(args.model, args.shape,
                                 Path(tempfile.mkdtemp(prefix="serve-load-")) / args.shape)

    levels = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.dtype)
    try:
        name = model_id(url)
        import openai

        warm = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
        one_request(warm, name, PROMPTS[0], 2)  # first-call allocations are not throughput
        rows = []
        for c in levels:
            row = run_level(url, name, c, args.duration, args.max_tokens)
            rows.append(row)
            print(f"{c:>3} clients: {row['requests_per_s']:.2f} req/s, "
                  f"{row['output_tokens_per_s']:.1f} tok/s, latency p50 {row['latency_p50_s']}s "
                  f"p95 {row['latency_p95_s']}s, TTFT p50 {row['ttft_p50_s']}s "
                  f"p95 {row['ttft_p95_s']}s, {row['requests']} requests, "
                  f"{row['errors']} errors", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    load_mid = os.getloadavg()
    offline = offline_sequential(args.model, args.max_tokens, args.offline_rounds, args.dtype)
    # "a single request's latency": the 1-client level, the same prompt mix. Its answers
    # differ in length (some stop after a token, some run to --max-tokens), so latency is
    # bimodal and p95 is compared with p95 (p95 over p50 is 3.9x at 1 client, with no
    # concurrency at all); per request, its latency over its own prompt's 1-client median
    # is the slowdown concurrency caused
    one = next((r for r in rows if r["clients"] == 1), None)
    by_level = [r.pop("_by_prompt") for r in rows]
    alone = {k: statistics.median(v) for k, v in by_level[rows.index(one)].items()} if one else {}
    for r, by_prompt in zip(rows, by_level, strict=True):
        r["tokens_per_s_vs_sequential"] = round(r["output_tokens_per_s"]
                                                / offline["output_tokens_per_s"], 3)
        r["p95_vs_single"] = (round(r["latency_p95_s"] / one["latency_p95_s"], 3)
                              if one and r["latency_p95_s"] else None)
        r["p95_vs_single_p50"] = (round(r["latency_p95_s"] / one["latency_p50_s"], 3)
                                  if one and r["latency_p95_s"] else None)
        slow = [x / alone[k] for k, xs in by_prompt.items() if k in alone for x in xs]
        r["slowdown_p50"] = _pct(slow, 50) if slow else None
        r["slowdown_p95"] = _pct(slow, 95) if slow else None
    print(f"offline one at a time: {offline['output_tokens_per_s']:.1f} tok/s; "
          + ", ".join(f"{r['clients']} clients x{r['tokens_per_s_vs_sequential']} tok/s, "
                      f"p95 x{r['p95_vs_single']} single (x{r['p95_vs_single_p50']} its p50), "
                      f"slowdown p95 x{r['slowdown_p95']}" for r in rows))
    top = next((r for r in rows if r["clients"] == 16), None)
    result = {"command": "python " + " ".join(sys.argv), "model": args.model,
              "dtype": args.dtype, "cpu_capability": cpu_capability(),
              "shape": ({"name": args.shape, "random_init": True, "tokenizer_from": shaped_from,
                         **SHAPES[args.shape]} if args.shape else None),
              "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
              "duration_s_per_level": args.duration, "levels": rows, "offline": offline,
              "target": "16 clients: >= 4x sequential tokens/s and p95 <= 3x single latency",
              "single_latency": "the 1-client level's latency at the same quantile (p95_vs_single"
                                "); p95_vs_single_p50 divides by its p50; slowdown_*: each "
                                "request's latency / its prompt's 1-client median",
              "target_met": (None if top is None else bool(
                  top["tokens_per_s_vs_sequential"] >= 4 and (top["p95_vs_single"] or 99) <= 3)),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "usable_cpus": len(os.sched_getaffinity(0))
                          if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                          "loadavg_before": [round(x, 2) for x in load_before],
                          "loadavg_after_server": [round(x, 2) for x in load_mid],
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]}}
    if args.out:
        from reprotune import io

        io.write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.shape:  # the shaped copy is GBs in a temporary folder
        import shutil

        shutil.rmtree(Path(args.model).parent, ignore_errors=True)


if __name__ == "__main__":
    main()

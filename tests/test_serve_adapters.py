"""`make serve ADAPTERS=...`: two LoRA adapters, each trained on one task, served from one
process over one base. Requests for both, in flight together, are answered exactly as each
adapter alone answers offline (greedy, batch 1, merged as `make serve MODEL=` serves it), in
the same continuous-batching steps; an unknown model is a 404 naming the choices; adapters on
different bases, or folders that are no LoRA adapter, are refused in one line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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
pytest.importorskip("peft")

from test_serve import START_S, _client, _stop  # noqa: E402

from reprotune import io  # noqa: E402
from reprotune.deploy.served_model import ServeError, load_served_model  # noqa: E402

# one task per adapter: the same prompts, answered differently, so that a request routed to
# the wrong adapter shows
TASKS = {"math": [("What is 12 plus 7?", "19"), ("What is 3 plus 4?", "7"),
                  ("Convert 3 kilometres to metres.", "3000")],
         "zh": [("What is 12 plus 7?", "十九"), ("What is 3 plus 4?", "七"),
                ("Convert 3 kilometres to metres.", "三千米")]}
# longer than a KV-cache page (64 tokens): with prefix caching, the second adapter to see
# it would reuse the first one's keys and values, which its own adapter computes differently
LONG = "Translate 'good morning' into Chinese, and 'apple' too. " * 8
PROMPTS = [[{"role": "user", "content": p}] for p, _ in TASKS["math"]] + \
    [[{"role": "user", "content": LONG}]]
MAX_TOKENS = 12
# different target layers, ranks and scalings (alpha / r: 2 and, as saved, 3), so a mixed
# batch step must give each layer and token exactly its own adapter's update
SHAPES = {"math": (8, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], 16),
          "zh": (4, ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"], 12)}


def train_adapter(base_dir: Path, out: Path, pairs: list[tuple[str, str]],
                  shape: tuple[int, list[str], int]) -> Path:
    """A LoRA adapter as the train stage writes it, fitted for a few steps on ``pairs``
    (``shape``: r, target modules, the alpha it is saved with: trained at scaling 2, then
    ``B`` rescaled so that it computes the same update at the saved scaling)."""
    from peft import LoraConfig, get_peft_model

    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    tok = load_tokenizer(base_dir)
    torch.manual_seed(0)
    r, targets, alpha = shape
    model = get_peft_model(load_model(base_dir), LoraConfig(r=r, lora_alpha=2 * r,
                                                            target_modules=targets))
    texts = [tok.apply_chat_template([{"role": "user", "content": p},
                                      {"role": "assistant", "content": a}], tokenize=False,
                                     enable_thinking=False) for p, a in pairs]
    fit_lora(model, tok, texts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2 * r / alpha)
    model.peft_config["default"].lora_alpha = alpha
    save_finetuned(model.eval(), tok, out, method="lora", base_dir=base_dir,
                   enable_thinking=False)
    return out


def offline(folder: Path, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """(text, token ids) of ``folder`` served alone, generated greedily one prompt at a time."""
    from reprotune.evaluate.generation import generate_ids

    served = load_served_model(folder)
    out = generate_ids(served.model, [served.render(messages)], stops=served.stops,
                       pad_id=served.tokenizer.pad_token_id, max_new_tokens=MAX_TOKENS,
                       batch_size=1, progress=False)[0]
    ids = [t for t in out if t not in served.stops]
    return served.decode(ids), ids


@pytest.fixture(scope="module")
def adapters(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: train_adapter(tiny_base_dir, root / name, pairs, SHAPES[name])
            for name, pairs in TASKS.items()}


@pytest.fixture(scope="module")
def want(adapters: dict[str, Path]) -> dict[tuple[str, int], tuple[str, list[int]]]:
    """Each adapter's offline greedy answer to each prompt."""
    return {(name, i): offline(folder, m) for name, folder in adapters.items()
            for i, m in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path]) -> Iterator[str]:
    """`python -m reprotune.deploy.server --adapters math=... zh=...` on 127.0.0.1:<free>."""
    proc = subprocess.Popen([sys.executable, "-m", "reprotune.deploy.server", "--port", "0",
                             "--adapters", *(f"{n}={p}" for n, p in adapters.items())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the port is bound
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        assert m, f"server did not start: {line!r} {proc.stderr.read()[-2000:]}"
        deadline = time.monotonic() + START_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"{m.group(1)}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        assert proc.poll() is None and time.monotonic() < deadline, "server not healthy"
        yield m.group(1)
    finally:
        assert _stop(proc) == 0


def test_each_adapter_learned_its_own_task(want: dict) -> None:
    """The premise: the adapters answer their own task (all three trained answers here; two
    of three allowed where float reductions make training drift), and differ everywhere."""
    for name, pairs in TASKS.items():
        learned = [want[name, i][0] == a for i, (_, a) in enumerate(pairs)]
        assert sum(learned) >= 2, (name, [want[name, i][0] for i in range(len(pairs))])
    assert all(want["math", i] != want["zh", i] for i in range(len(PROMPTS)))


def test_mixed_steps_route_each_request_to_its_adapter(adapters: dict[str, Path],
                                                       want: dict) -> None:
    """In process, token ids: concurrent requests alternating adapters share batch steps,
    and every one's tokens equal its adapter's offline greedy tokens."""
    import asyncio

    from reprotune.deploy.adapters import load_adapters, parse_specs
    from reprotune.deploy.engine import Engine

    served, router = load_adapters(parse_specs([f"{n}={p}" for n, p in adapters.items()]))
    assert len({id(s.model) for s in served.values()}) == 1  # one base in memory
    jobs = [(name, i) for _ in range(3) for i in range(len(PROMPTS)) for name in TASKS]

    async def run() -> list[list[int]]:
        engine = Engine(next(iter(served.values())), router=router)

        async def one(name: str, i: int) -> list[int]:
            s = served[name]
            async for out, _ in engine.generate(s.render(PROMPTS[i]), MAX_TOKENS,
                                                streaming=False, adapter=name, stops=s.stops):
                final = out
            return [t for t in final if t not in s.stops]

        try:
            return await asyncio.gather(*(one(n, i) for n, i in jobs))
        finally:
            engine.stop()

    got = asyncio.run(run())
    assert got == [want[j][1] for j in jobs]
    assert router.mixed_steps > 0  # both adapters' tokens were in one forward pass


@pytest.mark.slow
def test_one_server_answers_each_request_with_its_adapter(server: str, want: dict) -> None:
    """The real server, 16 concurrent requests alternating adapters (the long prompt twice
    per adapter): each answer is its adapter's offline greedy answer; streaming too."""
    client = _client(server)
    assert [m.id for m in client.models.list().data] == list(TASKS)
    jobs = [(name, i) for _ in range(2) for i in range(len(PROMPTS)) for name in TASKS]

    def ask(job: tuple[str, int]) -> tuple[str, int]:
        resp = client.chat.completions.create(model=job[0], messages=PROMPTS[job[1]],
                                              max_tokens=MAX_TOKENS)
        return resp.choices[0].message.content, resp.usage.completion_tokens

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for job, (text, n) in zip(jobs, got, strict=True):
        expected, ids = want[job]
        assert (text, n) == (expected, len(ids)), job
    for name in TASKS:
        stream = client.chat.completions.create(model=name, messages=PROMPTS[3],
                                                max_tokens=MAX_TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            want[name, 3][0]


@pytest.mark.slow
def test_unknown_model_is_a_404_naming_the_adapters(server: str) -> None:
    r = requests.post(f"{server}/v1/chat/completions", timeout=30,
                      json={"model": "legal", "messages": PROMPTS[0]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["message"] == ("model 'legal' is not served here; the models are "
                                            "'math', 'zh' (GET /v1/models)")
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_adapters_on_another_base_or_no_lora_are_refused(adapters: dict[str, Path],
                                                         tiny_base_dir: Path,
                                                         tmp_path: Path) -> None:
    from reprotune.deploy.adapters import check_specs, parse_specs

    other = tmp_path / "other"
    shutil.copytree(adapters["zh"], other)
    info = io.read_json(other / "reprotune_train.json")
    io.write_json(other / "reprotune_train.json", {**info, "base_dir": str(tmp_path / "base2")})
    with pytest.raises(ServeError) as err:
        check_specs(parse_specs([f"math={adapters['math']}", f"legal={other}"]))
    assert str(err.value) == (f"adapter legal ({other}) is on base {tmp_path / 'base2'}, not "
                              f"{tiny_base_dir.resolve()} (the base of math); adapters served "
                              f"together share one base")
    with pytest.raises(ServeError, match=r"^adapter base \(.*\): no reprotune_train.json, "
                                         r"not a LoRA adapter the train stage wrote; "):
        check_specs(parse_specs([f"base={tiny_base_dir}"]))
    dora = tmp_path / "dora"
    shutil.copytree(adapters["zh"], dora)
    config = io.read_json(dora / "adapter_config.json")
    io.write_json(dora / "adapter_config.json", {**config, "use_dora": True})
    with pytest.raises(ServeError, match=r"^adapter d \(.*\): a LoRA adapter with use_dora, "
                                         r"not a plain LoRA adapter; "):
        check_specs(parse_specs([f"d={dora}"]))
    for bad in (["math"], [f"a b={other}"], [f"m={other}", f"m={other}"]):
        with pytest.raises(ServeError, match="^--adapters"):
            parse_specs(bad)
    proc = subprocess.run([sys.executable, "-m", "reprotune.deploy.server", "--port", "0",
                           "--adapters", f"math={adapters['math']}", f"legal={other}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"serve: {err.value}"

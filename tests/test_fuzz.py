"""Property-based fuzzing (Hypothesis) of the input readers and the server's request parsing.

Invariants (docs/bad-data.md, docs/deploy.md):

* readers: any bytes under any supported extension, and any mix of the accepted layouts
  written in any accepted encoding and then cut, patched or padded, end as kept rows +
  counted rejects that add up (each reject with its file, line, reason and detail; every
  kept record writable as UTF-8), or as ONE clean error line naming the file;
* server: any request body is a validated request or a 4xx whose message is one line and
  whose JSON body encodes; a prompt never holds a control token the client's text wrote
  (``--special-text plain`` decodes back to exactly the text sent); over HTTP, against the
  real app in this process, every answer is 2xx or 4xx.

Bounded for CI (~60 s on 2 loaded cores): fixed example counts, ``derandomize=True`` (the
same examples every run: a failure reproduces), no example database written.
``REPROTUNE_FUZZ_SCALE=10`` runs ten times the examples, from fresh random seeds.
"""

from __future__ import annotations

import codecs
import csv
import io as stdio
import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reprotune.data.ingest import REASONS  # noqa: E402
from reprotune.data.inputs import IngestError, ingest_files  # noqa: E402
from reprotune.data.readers import InputFileError  # noqa: E402
from reprotune.deploy.openai_api import ApiError, parse_body, validate_chat  # noqa: E402

SCALE = int(os.environ.get("REPROTUNE_FUZZ_SCALE", "1"))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.data_too_large])


# ------------------------------------------------------------------------------ texts, values
MARKERS = ["<|im_start|>", "<|im_end|>", "</think>", "<think>", "<tool_call>", "<|endoftext|>",
           "\\u", "\ufeff", "\u2028", "\r", "\r\n", "\x00", "\ud800", "\udfff", "NaN", "\"", "\\"]
chars = st.characters(codec="utf-8") | st.sampled_from(["中", "文", "，", "😀", "é", "\t", "\n"])
texts = st.lists(chars.map(str) | st.sampled_from(MARKERS), max_size=12).map("".join)
scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | \
    st.floats(allow_nan=True, allow_infinity=True) | texts
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(texts, kids, max_size=3), max_leaves=8)


# ------------------------------------------------------------------------------ reader inputs
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "robot"])
message = st.fixed_dictionaries({"role": ROLES | json_values, "content": texts | json_values},
                                optional={"loss_weight": st.sampled_from([0, 1, 0.5, "1"]),
                                          "reasoning_content": texts})
rows = st.one_of(
    st.fixed_dictionaries({"instruction": texts, "output": texts | json_values},
                          optional={"input": texts, "system": texts, "label": json_values,
                                    "history": json_values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values},
                          optional={"kto_tag": st.booleans(), "tools": json_values}),
    st.fixed_dictionaries({"conversations": st.lists(
        st.fixed_dictionaries({"from": ROLES, "value": texts}), max_size=4)}),
    st.fixed_dictionaries({"prompt": texts | st.lists(message, max_size=2),
                           "completion": texts | json_values},
                          optional={"label": st.booleans() | texts}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts | json_values,
                           "rejected": texts | json_values}),
    st.dictionaries(texts, json_values, max_size=3),
    json_values,
)


def _serialise(rows_: list, layout: str, ascii_only: bool) -> str:
    if layout == "array":
        return json.dumps(rows_, ensure_ascii=ascii_only)
    if layout == "pretty":
        return "".join(json.dumps(r, ensure_ascii=ascii_only, indent=2) + "\n" for r in rows_)
    if layout == "csv":
        out = stdio.StringIO()
        writer = csv.writer(out)
        writer.writerow(["instruction", "output"])
        for r in rows_:
            r = r if isinstance(r, dict) else {}
            writer.writerow([str(r.get("instruction", "")), str(r.get("output", ""))])
        return out.getvalue()
    return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows_)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "gbk", "latin-1"]


@st.composite
def input_files(draw: st.DrawFn) -> tuple[bytes, str]:
    """(file bytes, extension): rows in a layout and encoding, then 0-2 mutations."""
    ext = draw(st.sampled_from([".json", ".jsonl", ".csv"]))
    if draw(st.integers(0, 9)) == 0:  # one in ten: arbitrary bytes
        return draw(st.binary(max_size=600)), ext
    text = _serialise(draw(st.lists(rows, max_size=5)),
                      draw(st.sampled_from(["array", "lines", "pretty", "csv"])),
                      draw(st.booleans()))
    encoding = draw(st.sampled_from(ENCODINGS))
    try:
        data = text.encode(encoding, "surrogatepass" if encoding.startswith("utf-") else "strict")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["cut", "insert", "flip", "bom", "append"]))
        at = draw(st.integers(0, len(data)))
        if op == "cut":
            data = data[:at]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
        elif op == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        elif op == "bom":
            data = codecs.BOM_UTF8 + data
        else:
            data += draw(st.binary(min_size=1, max_size=3))
    return data, ext


def _ends_cleanly(data: bytes, ext: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"input{ext}")
        Path(path).write_bytes(data)
        try:
            res = ingest_files([path])
        except (InputFileError, IngestError) as exc:  # the file as a whole: one line, named
            msg = str(exc)
            assert msg.startswith(path) and len(msg.splitlines()) == 1, msg
            return
        c = res.counts
        assert c["rows_in"] == c["kept"] + c["rejected_total"] == len(res.records) + len(res.rejects)
        assert sum(c["rejected"].values()) == c["rejected_total"]
        for rej in res.rejects:
            assert rej["reason"] in REASONS and rej["source"] == path and rej["line"] >= 1
            assert rej["detail"]
        json.dumps(res.records, ensure_ascii=False).encode("utf-8")  # what the stage writes
        json.dumps(res.rejects, ensure_ascii=False).encode("utf-8")


@_settings(600)
@given(input_files())
@example((b'[["\\ud800"]]', ".json"))  # a lone surrogate inside a rejected row (found by CI)
@example((b'[{"messages": [{"role": "\\ud800", "content": "x"}]}]', ".json"))
def test_readers_end_in_counted_rows_or_one_clean_error(case: tuple[bytes, str]) -> None:
    _ends_cleanly(*case)


# ------------------------------------------------------------------------------ requests
content = texts | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                   "text": texts}), max_size=2) | json_values
chat_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system",
                                                               "assistant", "tool"]),
                                      "content": texts | texts | content})
KNOWN = ["max_tokens", "max_completion_tokens", "stream", "stream_options", "temperature",
         "top_p", "n", "stop", "tools", "logprobs", "seed", "user", "x\ny"]
chat_bodies = st.tuples(  # mostly well-formed, with up to two fields set to anything
    st.fixed_dictionaries({"model": st.sampled_from(["merged", "merged", "merged", "other"]),
                           "messages": st.lists(chat_message, min_size=1, max_size=3)}),
    st.dictionaries(st.sampled_from(["model", "messages", *KNOWN]),
                    st.integers(-3, 6) | st.booleans() | json_values, max_size=2),
).map(lambda parts: {**parts[0], **parts[1]})
raw_bodies = st.one_of(
    chat_bodies.map(lambda b: json.dumps(b).encode()),  # ensure_ascii: lone surrogates as \u
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 50_000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}"),
)


def _clean_error(exc: ApiError) -> None:
    assert 400 <= exc.status < 500
    assert len(exc.message.splitlines()) == 1
    json.dumps(exc.body(), ensure_ascii=False).encode("utf-8")


@_settings(800)
@given(raw_bodies)
def test_request_parsing_is_a_request_or_a_clean_4xx(raw: bytes) -> None:
    try:
        req = validate_chat(parse_body(raw), model_ids=["merged"], default_max_tokens=2,
                            max_tokens_limit=4)
    except ApiError as exc:
        _clean_error(exc)
        hypothesis.event(f"{exc.status} {str(exc.param).split('[')[0].split('.')[0]}")
        return
    hypothesis.event("valid request")
    assert req.messages and all(isinstance(m["content"], str) for m in req.messages)
    assert 1 <= req.max_tokens <= 4


@pytest.fixture(scope="module")
def served(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from serve_helpers import write_merged

    from reprotune.deploy.served_model import load_served_model

    return load_served_model(write_merged(tiny_base_dir, tmp_path_factory.mktemp("fuzz")))


@_settings(200)
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                       "content": texts}), min_size=1, max_size=3))
def test_prompts_never_hold_a_control_token_the_text_wrote(served, messages: list) -> None:
    from reprotune.deploy.request_guard import find_marker, prompt_ids
    from reprotune.markup import forbidden_strings

    messages = [m for m in messages if "\ud800" not in m["content"]  # parse_body's 400s
                and "\udfff" not in m["content"]] or [{"role": "user", "content": "q"}]
    forbidden = forbidden_strings(served.tokenizer)
    for mode in ("refuse", "plain"):
        try:
            ids = prompt_ids(served, messages, special_text=mode, forbidden=forbidden)
        except ApiError as exc:
            _clean_error(exc)
            continue
        if find_marker(messages, forbidden) is None:  # rendered as evaluation renders it
            assert ids == served.render(messages)
        elif mode == "plain":  # the text exactly as sent, in the template's frame, control
            marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # tokens only where the
            skeleton = served.tokenizer.apply_chat_template(  # template itself wrote them
                [dict(m, content=marks[i]) for i, m in enumerate(messages)], tokenize=False,
                add_generation_prompt=True, enable_thinking=False)
            sent = skeleton
            for mark, m in zip(marks, messages, strict=True):
                sent = sent.replace(mark, m["content"])
            assert served.tokenizer.decode(ids) == sent
            added = set(served.tokenizer.get_added_vocab().values())
            want = served.tokenizer(skeleton, add_special_tokens=False)["input_ids"]
            assert [i for i in ids if i in added] == [i for i in want if i in added]


@pytest.fixture(scope="module")
def server_url(served):
    from serve_helpers import running

    from reprotune.deploy.server import build_app

    with running(build_app(served, max_tokens_limit=4, default_max_tokens=2,
                           special_text="plain")) as url:
        yield url


@_settings(100)
@given(raw_bodies)
def test_server_answers_2xx_or_4xx(server_url: str, raw: bytes) -> None:
    requests = pytest.importorskip("requests")
    r = requests.post(f"{server_url}/v1/chat/completions", data=raw, timeout=60,
                      headers={"content-type": "application/json"})
    hypothesis.event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics: the mix
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert len(r.json()["error"]["message"].splitlines()) == 1

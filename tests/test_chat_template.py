"""The embedded Qwen3 chat template: identical to the official one, rendered faithfully."""

from __future__ import annotations

import hashlib
import json

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from reprotune.chat_template import qwen3_template, template_fingerprint

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city (城市天气)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "single_turn": ([{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}], None),
    "with_system": ([{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "计算 12 加 7"},
                     {"role": "assistant", "content": "19"}], None),
    "multi_turn": ([{"role": "user", "content": "Translate apple"},
                    {"role": "assistant", "content": "苹果"},
                    {"role": "user", "content": "And pear?"},
                    {"role": "assistant", "content": "梨"}], None),
    "tools": ([{"role": "system", "content": "Use tools when useful."},
               {"role": "user", "content": "Weather in Paris & Rome?"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris"}}},
                               {"type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Rome"}}}]},
               {"role": "tool", "content": '{"temp_c": 21}'},
               {"role": "tool", "content": '{"temp_c": 25}'},
               {"role": "assistant", "content": "Paris 21 °C, Rome 25 °C."}], TOOLS),
}


def _direct_render(template: str, messages, tools, **kw) -> str:
    """Render with jinja2 directly, configured as transformers documents for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    # HF's tojson: plain json.dumps (jinja's own escapes HTML and sorts keys)
    env.filters["tojson"] = lambda x, **a: json.dumps(x, ensure_ascii=False, **a)
    return env.from_string(template).render(messages=messages, tools=tools, **kw)


def test_embedded_template_is_the_official_file(shared_dir):
    fixture = (shared_dir / "fixtures" / "qwen3_chat_template.jinja").read_bytes()
    assert qwen3_template().encode("utf-8") == fixture


def test_fingerprint_is_sha256_of_utf8_bytes():
    tpl = qwen3_template()
    assert template_fingerprint(tpl) == hashlib.sha256(tpl.encode("utf-8")).hexdigest()
    assert len(template_fingerprint(tpl)) == 64
    assert template_fingerprint(tpl) != template_fingerprint(tpl + "\n")


def test_tiny_base_carries_the_template(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    assert tok.chat_template == qwen3_template()
    info = json.loads((tiny_base_dir / "reprotune_base.json").read_text(encoding="utf-8"))
    assert info["chat_template_sha256"] == template_fingerprint(qwen3_template())


def test_known_rendering_of_a_single_turn(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    msgs, _ = CONVERSATIONS["single_turn"]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_tokenizer_rendering_equals_direct_jinja(tiny_base_dir, shared_dir, name, enable_thinking):
    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    fixture = (shared_dir / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    messages, tools = CONVERSATIONS[name]
    for add_prompt in (False, True):
        msgs = messages[:-1] if add_prompt else messages
        got = tok.apply_chat_template(msgs, tools=tools, tokenize=False,
                                      add_generation_prompt=add_prompt,
                                      enable_thinking=enable_thinking)
        want = _direct_render(fixture, msgs, tools, add_generation_prompt=add_prompt,
                              enable_thinking=enable_thinking)
        assert got == want


def test_tool_rendering_details(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    messages, tools = CONVERSATIONS["tools"]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.count("<|im_start|>assistant\n") == 2
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    # consecutive tool messages share one user turn
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>\n<tool_response>' in text
    # the think block only precedes the final answer, not the tool-calling turn
    assert text.count("<think>") == 1
    assert '"description": "Weather for a city (城市天气)"' in text

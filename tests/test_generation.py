"""Batched generation: prompt rendering, left padding == unpadded, stop tokens, seeding."""

from __future__ import annotations

import pytest

from reprotune.evaluate.generation import (
    generate,
    generate_ids,
    needs_unpadded_batches,
    render_prompts,
    stop_token_ids,
    strip_think,
)

PROMPTS = [  # deliberately not sorted by length; one multi-turn, one with a system prompt
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "计算 12 加 7 等于多少？"}],
    [{"role": "user", "content": "What is 12 plus 7?"},
     {"role": "assistant", "content": "19"},
     {"role": "user", "content": "Translate 'apple' into Chinese, please, and explain why."}],
    [{"role": "user", "content": "Convert 3 kilometres to metres."}],
]


def _perturb(model, seed: int, scale: float) -> None:
    """A random-init tiny model only ever says "\\n"; larger seeded weights make it chatty."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def lm(tiny_base_dir):
    from reprotune.modeling import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_base_dir), load_model(tiny_base_dir)
    _perturb(model, seed=1, scale=0.3)
    return model.eval(), tok


def test_strip_think():
    assert strip_think("<think>\nplan\n</think>\n\nAnswer") == "Answer"
    assert strip_think("  plain  ") == "plain"
    assert strip_think("reasoning...</think>\nAnswer") == "Answer"  # opened in the prompt
    assert strip_think("Ans<think>never closed") == "Ans"
    assert strip_think("<think></think>a<think>x</think>b") == "ab"


def test_prompts_end_with_the_generation_prompt(lm):
    _, tok = lm
    ids = render_prompts(tok, PROMPTS[2:3], None, enable_thinking=False)[0]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n")
    assert "<|im_start|>assistant\n19<|im_end|>\n" in text  # earlier turns stay in the prompt
    assert text.endswith("explain why.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = tok.decode(render_prompts(tok, PROMPTS[2:3], None, enable_thinking=True)[0])
    assert thinking.endswith("<|im_start|>assistant\n")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    with_tools = tok.decode(render_prompts(tok, PROMPTS[:1], [tools], enable_thinking=False)[0])
    assert "# Tools" in with_tools and '"name": "add"' in with_tools
    with pytest.raises(ValueError, match="2 tool lists for 1 prompts"):
        render_prompts(tok, PROMPTS[:1], [None, None], enable_thinking=False)


def test_left_padded_batches_equal_single_prompt_greedy(lm):
    model, tok = lm
    ids = render_prompts(tok, PROMPTS, None, enable_thinking=False)
    assert len({len(x) for x in ids}) == 4  # the batch really needs padding
    stops = stop_token_ids(model, tok)
    batched = generate_ids(model, ids, stops=stops, pad_id=tok.pad_token_id, max_new_tokens=12,
                           batch_size=3, progress=False)
    single = [generate_ids(model, [x], stops=stops, pad_id=tok.pad_token_id, max_new_tokens=12,
                           batch_size=1, progress=False)[0] for x in ids]
    assert batched == single
    assert sum(len(x) for x in batched) > 12 and len({tuple(x) for x in batched}) == 4
    texts = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    assert texts == [strip_think(tok.decode(x, skip_special_tokens=True)) for x in single]
    assert generate(model, tok, [], max_new_tokens=4, batch_size=2) == []


def test_generation_stops_at_im_end(lm):
    model, tok = lm
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(model, tok)
    ids = render_prompts(tok, PROMPTS, None, enable_thinking=False)
    calls = {"n": 0}

    def force_im_end_at_step_4(_module, _inputs, output):
        calls["n"] += 1  # one lm_head call per generated token (first = prefill)
        if calls["n"] == 4:
            output[..., im_end] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_im_end_at_step_4)
    try:
        out = generate_ids(model, ids, stops=[im_end], pad_id=tok.pad_token_id,
                           max_new_tokens=20, batch_size=4, progress=False)
    finally:
        handle.remove()
    assert calls["n"] == 4  # generation ended when every row had emitted <|im_end|>
    assert [len(x) for x in out] == [3, 3, 3, 3]
    assert all(im_end not in x for x in out)


def test_im_end_stops_even_when_eos_is_endoftext(lm):
    model, tok = lm
    import copy

    tok2 = copy.deepcopy(tok)
    tok2.eos_token = "<|endoftext|>"  # like a real Qwen3 *base* model
    model.generation_config.eos_token_id, saved = None, model.generation_config.eos_token_id
    try:
        ids = stop_token_ids(model, tok2)
    finally:
        model.generation_config.eos_token_id = saved
    assert ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"),
                          tok.convert_tokens_to_ids("<|endoftext|>")})


def test_sampling_is_seeded(lm):
    model, tok = lm
    kw = dict(max_new_tokens=10, batch_size=2, do_sample=True, temperature=1.0, top_p=0.95,
              progress=False)
    a = generate(model, tok, PROMPTS, seed=3, **kw)
    assert generate(model, tok, PROMPTS, seed=3, **kw) == a
    assert generate(model, tok, PROMPTS, seed=4, **kw) != a


def test_prompt_tuning_batches_without_padding(tiny_base_dir):
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from reprotune.modeling import load_model, load_tokenizer

    tok, base = load_tokenizer(tiny_base_dir), load_model(tiny_base_dir)
    _perturb(base, seed=1, scale=0.3)
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                    num_virtual_tokens=4)).eval()
    _perturb(model.prompt_encoder, seed=2, scale=0.5)
    assert needs_unpadded_batches(model) and not needs_unpadded_batches(base)
    ids = render_prompts(tok, PROMPTS, None, enable_thinking=False)
    kw = dict(stops=stop_token_ids(model, tok), pad_id=tok.pad_token_id, max_new_tokens=8,
              progress=False)
    batched = generate_ids(model, ids, batch_size=4, **kw)
    assert batched == [generate_ids(model, [x], batch_size=1, **kw)[0] for x in ids]

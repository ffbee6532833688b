"""GGUF out and back on the real pretrained model (SmolLM2-135M-Instruct, Llama architecture).

The float32 base folder is exported as F16 and Q8_0, each file is loaded back with the loader
the base stage uses for GGUF input (transformers' GGUF loader + reprotune.gguf_import), and the
result is compared with the source: weights, tokenizer ids, perplexity, greedy answers.
Cost: ~35 s on an idle 2-core machine (two ~5 s exports, two loads, one short greedy run).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from reprotune.deploy.gguf_export import (  # noqa: E402
    GGUF_FILE,
    export_gguf,
    load_exported,
    read_gguf_summary,
)
from reprotune.deploy.quant_common import TARGET_LOSS_PCT  # noqa: E402

KEEP = ["embed_tokens", "lm_head"]
CONVERSATIONS = [("What is the capital of France?", "The capital of France is Paris."),
                 ("Add 1234 and 5678.", "1234 + 5678 = 6912."),
                 ("把“我喜欢学习”翻译成英文。", "I like studying."),
                 ("Give one tip for staying healthy.", "Drink water and sleep enough.")]
GREEDY_TOKENS = 12
# Q8_0 stores each block of 32 weights as int8 * (absmax / 127): every rounding error is at
# most absmax/254, and a block's norm is at least its absmax, so no matrix can lose more than
# sqrt(32)/254 of its norm (relative Frobenius error), whatever the weights.
Q8_0_MAX_REL_ERROR = math.sqrt(32) / 254


@pytest.fixture(scope="module")
def source(smollm2_base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_base))


@pytest.fixture(scope="module")
def round_trip(smollm2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("smollm2_gguf")
    result = {}
    for q in ("f16", "q8_0"):
        info = export_gguf(smollm2_base, out / q / GGUF_FILE, qtype=q, keep_full_precision=KEEP,
                           enable_thinking=False, chat_template_sha256="sha")
        model, tok = load_exported(out / q / GGUF_FILE)
        result[q] = {"info": info, "path": out / q / GGUF_FILE, "model": model, "tok": tok}
    return result


def _chat_ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def _logits(model, seqs: list[list[int]]) -> list:
    """Each sequence's logits, from one right-padded batch (padding is never attended to)."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def _nll(logits, ids: list[int]):
    logp = torch.log_softmax(logits[:-1], -1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@pytest.mark.slow
def test_smollm2_gguf_metadata(round_trip: dict, source) -> None:
    """What llama.cpp's converter writes for SmolLM2 (and what its own published GGUF has)."""
    _, tok = source
    for q, types in (("f16", {"F16": 211, "F32": 61}),
                     ("q8_0", {"F16": 1, "F32": 61, "Q8_0": 210})):
        s = read_gguf_summary(round_trip[q]["path"])
        assert s["architecture"] == "llama" and s["block_count"] == 30
        assert s["rope_dimension_count"] == 64 and s["n_vocab"] == 49152
        assert "output.weight" not in s["tensors"]  # tied: llama.cpp reuses token_embd
        assert s["chat_template"] == tok.chat_template
        assert round_trip[q]["info"]["tensor_types"] == types
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(round_trip["q8_0"]["path"]))

    def field(key: str):
        return meta[f"tokenizer.ggml.{key}"]

    assert (field("model"), field("pre")) == ("gpt2", "smollm")
    assert [field(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 2]
    assert field("add_bos_token") is False
    errors = round_trip["q8_0"]["info"]["layer_errors"]
    assert len(errors) == 210 and max(errors.values()) < Q8_0_MAX_REL_ERROR
    assert 0.003 < sum(errors.values()) / len(errors) < 0.01  # measured: 0.0056


@pytest.mark.slow
def test_smollm2_gguf_weights_are_the_sources_rounded(round_trip: dict, source) -> None:
    """Every weight loaded back is exactly the F16 / Q8_0 rounding of the source's: the Q/K
    permutation and its reversal are exact, so all later differences are the format's."""
    model, _ = source
    qt = gguf.GGMLQuantizationType.Q8_0
    f16 = round_trip["f16"]["model"].state_dict()
    q8 = round_trip["q8_0"]["model"].state_dict()
    for name, w in model.state_dict().items():
        if w.ndim == 1:
            assert torch.equal(f16[name], w) and torch.equal(q8[name], w), name
            continue
        assert torch.equal(f16[name], w.half().float()), name
        if any(k in name for k in KEEP):  # kept (the head is tied to the embeddings)
            expected = w.half().float()
        else:
            expected = torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt).reshape(w.shape))
        assert torch.equal(q8[name], expected), name


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_encodes_the_same_ids(round_trip: dict, source) -> None:
    _, tok = source
    texts = ["The quick brown fox jumps over the lazy dog.", "我喜欢学习机器翻译。",
             "Order 12345 costs $678.90 (2024-05-06).", "  two leading spaces\nand 3 lines\n\n"]
    for q in ("f16", "q8_0"):
        g_tok = round_trip[q]["tok"]
        for text in texts:
            assert g_tok(text, add_special_tokens=False)["input_ids"] == tok(
                text, add_special_tokens=False)["input_ids"], (q, text)
        assert g_tok.chat_template == tok.chat_template
        assert (g_tok.eos_token_id, g_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        messages = [{"role": "user", "content": "Add 1234 and 5678."}]
        assert _chat_ids(g_tok, messages, True) == _chat_ids(tok, messages, True)


@pytest.mark.slow
def test_smollm2_gguf_answers_and_perplexity_match(round_trip: dict, source) -> None:
    """F16: the same greedy answers and perplexity within 0.5% (measured +0.15%). Q8_0: its
    measured loss, bounded as below."""
    model, tok = source
    convs = [_chat_ids(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       False) for q, a in CONVERSATIONS]
    prompts = [_chat_ids(tok, [{"role": "user", "content": q}], True) for q, _ in CONVERSATIONS[:2]]
    answers = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p])
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=GREEDY_TOKENS, pad_token_id=tok.pad_token_id)
            answers.append(out[0, len(p):].tolist())
    assert tok.decode(answers[0]).startswith("The capital of France is Paris.")
    # teacher-forced on the source's greedy answers: the GGUF model's argmax agrees at every
    # step exactly when its own greedy answer is the same
    forced = [p + a for p, a in zip(prompts, answers, strict=True)]

    def run(m):
        out = _logits(m, convs + forced)
        nll = torch.cat([_nll(lg, ids) for lg, ids in zip(out, convs, strict=False)])
        steps = [lg[len(p) - 1:-1] for lg, p in zip(out[len(convs):], prompts, strict=True)]
        return nll, steps

    ref_nll, ref_steps = run(model)
    for q in ("f16", "q8_0"):
        nll, steps = run(round_trip[q]["model"])
        ppl_change_pct = (math.exp(float(nll.mean() - ref_nll.mean())) - 1) * 100
        agree = sum(int((st.argmax(-1) == torch.tensor(a)).sum())
                    for st, a in zip(steps, answers, strict=True))
        total = sum(map(len, answers))
        max_logit_diff = max(float((st - rs).abs().max())
                             for st, rs in zip(steps, ref_steps, strict=True))
        print(f"{q}: perplexity {ppl_change_pct:+.3f}%, max |logit diff| {max_logit_diff:.4f}, "
              f"greedy tokens agreeing {agree}/{total}")
        if q == "f16":
            # F16 keeps 11 significant bits: ~0.03 logits of difference after 30 layers
            assert max_logit_diff < 0.1 and abs(ppl_change_pct) < 0.5
            assert agree == total  # identical greedy answers
        else:
            # Q8_0 loses ~0.6% of each weight matrix (see above): a few % of the logits
            # (measured max 1.2), which moves perplexity only to second order (measured -0.6%).
            # The tolerance is the project's INT8 target, the one the quantize stage applies
            # to every int8 artifact (quant_common.TARGET_LOSS_PCT = 2%); greedy answers may
            # part at a near tie (measured: 1 of 73 tokens over four 24-token answers).
            assert max_logit_diff < 3.0
            assert abs(ppl_change_pct) < TARGET_LOSS_PCT
            assert agree >= 0.9 * total

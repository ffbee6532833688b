"""Batched generation for evaluation: chat-template prompts, left padding, greedy by default.

Prompts are rendered exactly as training renders conversations (the tokenizer's chat
template, ``add_generation_prompt=True``; in Qwen3 non-thinking mode the template appends
the empty ``<think>\\n\\n</think>\\n\\n`` block the model was trained to see). Prompts are
sorted by length so each batch pads little, and the answers come back in input order.
Memory stays bounded: only the generated ids of one batch are alive at a time (no scores
or logits are kept), under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

END_OF_TURN = "<|im_end|>"
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` blocks; an unclosed ``<think>`` drops everything after it
    (the model never reached an answer) and a lone ``</think>`` everything before it."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids that end a turn: the template's ``<|im_end|>``, the tokenizer's eos and the
    model's generation-config eos (real Qwen3 base models use ``<|endoftext|>``)."""
    ids: set[int] = set()
    im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    if not ids:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token: cannot stop")
    return sorted(ids)


def render_prompts(tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]],
                   tools: Sequence[Any] | None, *, enable_thinking: bool) -> list[list[int]]:
    """Token ids of each prompt conversation, ending with the assistant generation prompt."""
    if tools is not None and len(tools) != len(prompts):
        raise ValueError(f"{len(tools)} tool lists for {len(prompts)} prompts")
    out = []
    for i, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(
            [dict(m, content=m.get("content") or "") for m in messages],
            tools=(tools[i] or None) if tools is not None else None, tokenize=False,
            add_generation_prompt=True, enable_thinking=enable_thinking)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]],
             tools: Sequence[Any] | None = None, **kw: Any) -> list[str]:
    """The answers of :func:`generate_detailed`, without the cap flags."""
    return generate_detailed(model, tokenizer, prompts, tools, **kw)[0]


def generate_detailed(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict[str, Any]]],
                      tools: Sequence[Any] | None = None, *, max_new_tokens: int,
                      batch_size: int, enable_thinking: bool = False, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                      progress: bool = True, shard: tuple[int, int] = (0, 1),
                      ) -> tuple[list[str], list[bool]]:
    """Generate one answer per prompt conversation (``prompts[i]`` ends before the answer).

    ``tools`` is ``None`` or one tool list (or ``None``) per prompt. Greedy unless
    ``do_sample``; sampling uses only ``temperature`` and ``top_p`` (the model's own
    top-k / repetition settings are switched off so params.yaml is the whole story) and
    is seeded with ``seed``. Generation stops at ``<|im_end|>`` / eos; returned text has
    special tokens and any ``<think>`` block removed, and is stripped. The second list says
    which answers hit ``max_new_tokens`` before a stop token (cut short). ``shard`` =
    ``(rank, processes)`` shares the batches out over processes (see :func:`generate_ids`).
    """
    ids = render_prompts(tokenizer, prompts, tools, enable_thinking=enable_thinking)
    stops = stop_token_ids(model, tokenizer)
    new = generate_ids(model, ids, stops=stops, pad_id=tokenizer.pad_token_id,
                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                       progress=progress, shard=shard)
    texts = [strip_think(tokenizer.decode(x, skip_special_tokens=True)) for x in new]
    return texts, [len(x) >= max_new_tokens for x in new]


def generate_ids(model: Any, ids: Sequence[Sequence[int]], *, stops: Sequence[int],
                 pad_id: int | None, max_new_tokens: int, batch_size: int,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """New token ids per prompt (left-padded batches, longest first), each cut before its
    first stop id. Returned in input order.

    Data-parallel: with ``shard = (rank, processes)``, this process generates every
    ``processes``-th batch of the same batch list, and the answers are gathered from all
    processes (``torch.distributed``), so each process returns the full list. Whole batches
    are shared out, and sampling is seeded per batch (``seed`` + batch index), so the
    answers are exactly those of one process.
    """
    import torch
    from tqdm.auto import tqdm

    if not ids:
        return []
    ids = [list(x) for x in ids]
    if any(not x for x in ids):
        raise ValueError("empty prompt: nothing to condition generation on")
    pad_id = pad_id if pad_id is not None else stops[0]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and limit > max_new_tokens:
        too_long = [i for i, x in enumerate(ids) if len(x) > limit - max_new_tokens]
        if too_long:  # keep the end of the prompt: it holds the question being answered
            log.warning("%d prompts longer than %d tokens: left-truncated", len(too_long),
                        limit - max_new_tokens)
            for i in too_long:
                ids[i] = ids[i][-(limit - max_new_tokens):]
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                if do_sample else {"do_sample": False})
    # longest first: an out-of-memory error shows up on the first batch, not the last
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = _batches(order, ids, batch_size, same_length=needs_unpadded_batches(model))
    answers: list[list[int]] = [[] for _ in ids]
    was_training = model.training
    model.eval()
    rank, processes = shard
    mine = [(b, batch) for b, batch in enumerate(batches) if b % processes == rank]
    bar = tqdm(total=sum(len(batch) for _, batch in mine), desc="generate", unit="prompt",
               disable=not progress)
    with torch.inference_mode():
        for b, batch in mine:
            if do_sample:  # per batch: the same draws whichever process runs the batch
                torch.manual_seed(seed + b)
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, i in enumerate(batch):  # left padding: every prompt ends at the last column
                input_ids[j, width - len(ids[i]):] = torch.as_tensor(ids[i])
                mask[j, width - len(ids[i]):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=pad_id, num_beams=1, repetition_penalty=1.0,
                                 **sampling)
            for j, i in enumerate(batch):
                new = out[j, width:].tolist()
                answers[i] = new[:next((k for k, t in enumerate(new) if t in stops), len(new))]
            del out
            bar.update(len(batch))
    bar.close()
    model.train(was_training)
    if processes > 1:
        answers = _gather(answers, {i for _, batch in mine for i in batch}, processes)
    return answers


def _gather(answers: list[list[int]], done: set[int], processes: int) -> list[list[int]]:
    """Every process's answers, merged (each prompt was generated by exactly one process)."""
    import torch.distributed as dist

    parts: list[dict[int, list[int]] | None] = [None] * processes
    dist.all_gather_object(parts, {i: answers[i] for i in done})
    merged = list(answers)
    for part in parts:
        for i, ids in (part or {}).items():
            merged[i] = ids
    return merged



def needs_unpadded_batches(model: Any) -> bool:
    """True for peft prompt tuning / p-tuning: peft drops ``position_ids`` for them, so a
    left-padded prompt would be read at shifted positions (prefix tuning and LoRA are fine)."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False)
                and str(getattr(cfg, "peft_type", "")) not in ("PREFIX_TUNING",
                                                               "PeftType.PREFIX_TUNING"))


def _batches(order: list[int], ids: Sequence[Sequence[int]], batch_size: int, *,
             same_length: bool) -> list[list[int]]:
    """Consecutive chunks of ``order``; with ``same_length`` a chunk never mixes lengths."""
    if not same_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    log.info("prompt-learning model: batching only prompts of equal length (no padding)")
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and len(ids[out[-1][0]]) == len(ids[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out

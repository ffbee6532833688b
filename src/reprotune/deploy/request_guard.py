"""What request text may do to a prompt: never forge a turn, a think block or a tool call.

A chat template writes a conversation as one string, and the tokenizer turns strings such as
``<|im_end|>`` or ``<think>`` in it into single control-token ids: the same characters in a
user's message would otherwise close that message and open a system turn of the user's own.
Training rejects such rows (:mod:`reprotune.markup`, reason ``special_token``); the server
decides per request with :func:`prompt_ids`, by the ``--special-text`` it was started with:

* ``refuse`` (default): a 400 naming the message and the marker; the model never saw such
  text in training, and a client learns at once that its text was not taken as written;
* ``plain``: the text is encoded as ordinary characters (never a control-token id), so the
  prompt reads exactly what the client sent; the template's own markers stay control tokens.

Messages without markers are rendered exactly as evaluation renders them
(:meth:`reprotune.deploy.served_model.ServedModel.render`), so answers stay equal to offline
greedy generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reprotune import markup
from reprotune.deploy.openai_api import ApiError

SPECIAL_TEXT = ("refuse", "plain")
# a message's content in the skeleton rendering: Unicode private-use characters, never in
# a template's own text, and no control-token text
_MARK = "\ue000{}\ue001"


def find_marker(messages: Sequence[dict[str, str]], forbidden: Sequence[str]
                ) -> tuple[str, str] | None:
    """``(messages[i].content, marker)`` of the first control or markup string in the
    request's text, or None."""
    return markup.find_forbidden(list(messages), None, forbidden)


def _text_ids(tokenizer: Any, text: str, forbidden: Sequence[str]) -> list[int]:
    """Token ids of ``text`` as plain characters: the pieces between markers as the
    tokenizer encodes them; each marker character by character, so it never becomes the
    added token its whole string is."""
    ids: list[int] = []
    pattern = markup.forbidden_pattern(tuple(forbidden))
    pos = 0
    for hit in pattern.finditer(text):
        if hit.start() > pos:
            ids += tokenizer(text[pos:hit.start()], add_special_tokens=False)["input_ids"]
        for ch in hit.group(0):
            ids += tokenizer(ch, add_special_tokens=False)["input_ids"]
        pos = hit.end()
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    return ids


def plain_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *, enable_thinking: bool,
              forbidden: Sequence[str]) -> list[int]:
    """Prompt ids with every message's content encoded as plain text: the template renders
    the conversation around placeholders, its own text is encoded as usual (control tokens
    and all) and each content is spliced in by :func:`_text_ids`."""
    marks = [_MARK.format(i) for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template(
        [dict(m, content=marks[i]) for i, m in enumerate(messages)], tokenize=False,
        add_generation_prompt=True, enable_thinking=enable_thinking)
    ids: list[int] = []
    pos = 0
    for i, m in enumerate(messages):
        at = skeleton.find(marks[i], pos)
        if at < 0 or skeleton.count(marks[i]) != 1:
            raise ApiError(400, f"messages[{i}].content holds a control or markup string, and "
                                f"this model's chat template rewrites that message, so it "
                                f"cannot be kept as plain text; remove the marker",
                           param=f"messages[{i}].content")
        ids += tokenizer(skeleton[pos:at], add_special_tokens=False)["input_ids"]
        ids += _text_ids(tokenizer, m["content"], forbidden)
        pos = at + len(marks[i])
    return ids + tokenizer(skeleton[pos:], add_special_tokens=False)["input_ids"]


def prompt_ids(served: Any, messages: Sequence[dict[str, str]], *, special_text: str,
               forbidden: Sequence[str]) -> list[int]:
    """The prompt ids of a validated request (see the module doc); :class:`ApiError` 400 for
    a marker under ``refuse`` or for messages the chat template itself refuses."""
    from jinja2 import TemplateError

    hit = find_marker(messages, forbidden)
    try:
        if hit is None:
            return served.render(list(messages))
        if special_text == "refuse":
            fld, marker = hit
            raise ApiError(400, f"{fld} contains {marker!r}, a control or markup token of this "
                                f"model's chat template: taken as such it would forge a turn, "
                                f"so the server refuses it; remove it (a server started with "
                                f"--special-text plain encodes it as ordinary characters)",
                           param=fld)
        return plain_ids(served.tokenizer, messages, enable_thinking=served.enable_thinking,
                         forbidden=forbidden)
    except TemplateError as exc:
        raise ApiError(400, f"the model's chat template refuses these messages: {exc}",
                       param="messages") from None

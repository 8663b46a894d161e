"""Turn conversations into token ids and loss labels using the tokenizer's own chat template.

Which tokens are "the answer" is read off the template itself: for each assistant message i,
render messages[:i] with the generation prompt and messages[:i+1] without it; what the second adds
to the first is the answer plus the template's end-of-turn marker. Nothing about separators is
hard-coded, so any template whose renderings grow by appending works (ChatML, Llama-2, ...).
"""

from __future__ import annotations

from typing import Any

from lmmkit.data.schema import DataError, Message

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


class UnsupportedTemplateError(ValueError):
    """The chat template does not render conversations by appending, so spans cannot be found."""


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    conv = [{"role": m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise UnsupportedTemplateError(f"chat template rendered a {type(text).__name__}, expected a string")
    return text


def _assistant_char_spans(tokenizer: Any, messages: list[Message], full: str) -> list[tuple[int, int]]:
    """Character spans in `full` of each assistant answer plus its end-of-turn marker."""
    spans = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        if i == 0:
            # Templates cannot render an empty prompt, and an answer to nothing teaches nothing.
            raise DataError("conversation starts with an assistant turn; there is no prompt to answer")
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt):
            raise UnsupportedTemplateError(
                f"chat template is not prefix-stable: rendering messages[:{i}] with the generation prompt "
                f"is not a prefix of rendering messages[:{i + 1}] ({prompt[-40:]!r} vs {upto[len(prompt) - 40 : len(prompt)]!r}); "
                "assistant turns cannot be located, so this template is unsupported"
            )
        if not full.startswith(upto):
            raise UnsupportedTemplateError(
                f"chat template is not prefix-stable: rendering messages[:{i + 1}] is not a prefix of the "
                "whole conversation's rendering; this template is unsupported"
            )
        # Right-strip: the newline a template puts after the end-of-turn marker is not the model's
        # to predict, but the marker itself is, or the model never learns to stop.
        answer = upto[len(prompt) :].rstrip()
        spans.append((len(prompt), len(prompt) + len(answer)))
    return spans


def encode_conversation(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels: the ids on assistant tokens, -100 elsewhere.

    `tokenizer` must be a fast tokenizer (offset mapping) with a chat template. Assistant turns
    include their end-of-turn marker. Raises UnsupportedTemplateError for templates that do not
    render conversations by appending.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("encode_conversation needs a fast tokenizer (for offset mapping)")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, messages, full)
    # add_special_tokens=False: the template already wrote any bos/eos it wants as text.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_idx = 0
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        # Offsets and spans are both sorted, so one pass suffices.
        while span_idx < len(spans) and spans[span_idx][1] <= start:
            span_idx += 1
        if span_idx == len(spans):
            break
        s_start, s_end = spans[span_idx]
        # A token belongs to the answer if it overlaps it; zero-width tokens never do.
        if start < s_end and end > s_start:
            labels[t] = input_ids[t]
    return input_ids, labels


def encode_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the conversation so far plus the generation prompt, for inference.

    Tokenized the same way as encode_conversation, so a prompt matches what training saw.
    """
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

from __future__ import annotations

import copy

import pytest

from lmmkit.data.schema import DataError, Message
from lmmkit.data.templates import (
    IGNORE_INDEX,
    UnsupportedTemplateError,
    encode_conversation,
    encode_prompt,
)

# Llama-2 style: no generation prompt, system folded into the first user turn, answers end in eos.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CONVERSATIONS = [
    [
        Message("system", "You are a helpful assistant."),
        Message("user", "<image>\nWhat is in the picture?"),
        Message("assistant", "A cat sitting on a red mat."),
        Message("user", "What colour is the mat?"),
        Message("assistant", "The mat is red."),
    ],
    [
        Message("system", "Answer in one short sentence."),
        Message("user", "How many people are there?"),
        Message("assistant", "There are three people."),
        Message("user", "Where?"),
        Message("assistant", "Near the tree."),
        Message("user", "And the car?"),
        Message("assistant", "The car is blue."),
    ],
    [Message("user", "Hi"), Message("assistant", "Hello there.")],
]


def label_spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of unmasked labels."""
    spans: list[list[int]] = []
    prev = False
    for lab in labels:
        on = lab != IGNORE_INDEX
        if on and not prev:
            spans.append([])
        if on:
            spans[-1].append(lab)
        prev = on
    return spans


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chatml_labels_are_exactly_the_answers(tiny_tokenizer, conv: list[Message]) -> None:
    ids, labels = encode_conversation(tiny_tokenizer, conv)
    assert len(ids) == len(labels)
    chat = [{"role": m.role, "content": m.content} for m in conv]
    assert ids == tiny_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    answers = [m.content for m in conv if m.role == "assistant"]
    spans = label_spans(labels)
    assert [tiny_tokenizer.decode(s, skip_special_tokens=True) for s in spans] == answers
    # Each answer ends with the end-of-turn token (so the model learns to stop), and the newline
    # the template writes after it is not learned.
    eos = tiny_tokenizer.eos_token_id
    assert all(s[-1] == eos for s in spans)
    assert sum(lab == eos for lab in labels) == len(answers)
    # Unmasked labels equal the ids at those positions.
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_other_template_nothing_hard_coded(llama_tokenizer, tiny_tokenizer, conv: list[Message]) -> None:
    ids, labels = encode_conversation(llama_tokenizer, conv)
    text = llama_tokenizer.decode(ids)
    assert "[INST]" in text and "<|im_start|>" not in text
    answers = [m.content for m in conv if m.role == "assistant"]
    spans = label_spans(labels)
    # The template puts a space either side of the answer; the words are exactly the answer's.
    assert [llama_tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans] == answers
    assert all(s[-1] == llama_tokenizer.eos_token_id for s in spans)
    # The prompt side ("[/INST]") is never learned.
    assert all("INST" not in llama_tokenizer.decode(s) for s in spans)
    # Different template, different masking: not a ChatML rule in disguise.
    assert ids != encode_conversation(tiny_tokenizer, conv)[0]


def test_answer_containing_template_text_is_still_exact(tiny_tokenizer) -> None:
    conv = [Message("user", "Say assistant"), Message("assistant", "assistant\nassistant")]
    _, labels = encode_conversation(tiny_tokenizer, conv)
    assert [tiny_tokenizer.decode(s, skip_special_tokens=True) for s in label_spans(labels)] == [
        "assistant\nassistant"
    ]


def test_encode_prompt_is_prefix_of_training_ids(tiny_tokenizer) -> None:
    conv = CONVERSATIONS[0]
    ids, _ = encode_conversation(tiny_tokenizer, conv)
    prompt = encode_prompt(tiny_tokenizer, conv[:-1])
    assert ids[: len(prompt)] == prompt
    assert tiny_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    # The first label of the last answer sits right after the prompt.
    _, labels = encode_conversation(tiny_tokenizer, conv)
    assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX


def test_non_prefix_template_is_rejected(tiny_tokenizer) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    # Numbers turns from the end, so earlier renderings change as the conversation grows.
    tok.chat_template = (
        "{% for m in messages %}{{ (messages|length - loop.index0)|string + m['role'] + ': ' + m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(UnsupportedTemplateError, match="unsupported"):
        encode_conversation(tok, CONVERSATIONS[2])


def test_conversation_starting_with_assistant(tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="starts with an assistant turn"):
        encode_conversation(tiny_tokenizer, [Message("assistant", "Hi"), Message("user", "?")])

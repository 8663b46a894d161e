"""load_language_model: the image token is added when missing; a missing chat template is an error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lmmkit import IMAGE_TOKEN
from lmmkit.models.language import load_language_model


def test_tokenizer_without_image_token_gets_it_and_embeddings_grow(plain_llama_dir):
    original_tok = AutoTokenizer.from_pretrained(plain_llama_dir)
    original = LlamaForCausalLM.from_pretrained(plain_llama_dir)
    n = len(original_tok)
    assert IMAGE_TOKEN not in original_tok.get_vocab()
    assert original.get_input_embeddings().weight.shape[0] == n

    model, tok = load_language_model(plain_llama_dir)

    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == n  # appended after the existing vocabulary
    assert IMAGE_TOKEN in tok.all_special_tokens
    # One token, however it is surrounded: it must never be split into byte pieces.
    ids = tok("look: <image>\nwhat?", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 1
    # Input and output embeddings both gained exactly one row; the old rows are untouched.
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb_in.shape == (n + 1, original.config.hidden_size)
    assert emb_out.shape[0] == n + 1
    assert model.config.vocab_size == n + 1
    assert torch.equal(emb_in[:n], original.get_input_embeddings().weight)
    assert torch.equal(emb_out[:n], original.get_output_embeddings().weight)
    # The tokenizer had no pad token: it falls back to eos, so batches can be padded.
    assert original_tok.pad_token is None
    assert tok.pad_token == tok.eos_token
    # The new row is usable: a forward pass over the image id works.
    logits = model(input_ids=torch.tensor([[1, image_id, 2]])).logits
    assert logits.shape == (1, 3, n + 1)


def test_tokenizer_with_image_token_is_left_alone(tiny_llama_dir):
    original = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model, tok = load_language_model(tiny_llama_dir)
    assert len(tok) == original.config.vocab_size
    assert model.get_input_embeddings().weight.shape == original.get_input_embeddings().weight.shape
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != tok.unk_token_id


def test_tokenizer_without_chat_template_is_a_clear_error(no_template_llama_dir):
    with pytest.raises(ValueError, match="chat template") as info:
        load_language_model(no_template_llama_dir)
    assert str(no_template_llama_dir) in str(info.value)

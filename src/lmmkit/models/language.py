"""LLM + tokenizer loading: any AutoModelForCausalLM folder (or hub id), with the image token."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmmkit import IMAGE_TOKEN


def load_language_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an LLM and its tokenizer, making sure the tokenizer knows `<image>` and has a chat template.

    A tokenizer without `<image>` gets it as a new special token and the embedding matrix grows
    by one row (as LLaVA does). A tokenizer without a chat template is an error: labels are
    derived from the template, and guessing one silently would train on the wrong tokens.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{path}: the tokenizer has no chat template; lmmkit derives assistant-only labels from it. "
            "Set one (tokenizer.chat_template = ...; save_pretrained) or use an instruct model's tokenizer."
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        # Some models pad their embedding matrix beyond the tokenizer (Qwen): only ever grow it.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

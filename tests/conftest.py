"""Shared test fixtures."""

from __future__ import annotations

import pytest

CORPUS = [
    "<image>\nWhat is in the picture? A cat sitting on a red mat.",
    "Describe the image briefly. Two dogs play in the park with a ball.",
    "You are a helpful assistant. Answer in one short sentence.",
    "How many people are there? There are three people near the tree.",
    "What colour is the car? The car is blue and parked by the road.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE with the lmmkit special tokens and ChatML template (trains in ms)."""
    from lmmkit.models.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 10, vocab_size=400)

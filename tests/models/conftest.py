"""Tiny HF checkpoints on disk for the model tests (built with save_pretrained; no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiny_hf


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A GPT-2 (absolute positions: left padding must get position ids right) + the same tokenizer."""
    return tiny_hf.save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tiny_tokenizer)


@pytest.fixture(scope="session")
def plain_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer lacks <image> (and a pad token) but has a chat template."""
    return tiny_hf.save_tiny_llama(tmp_path_factory.mktemp("plain-llama"), tiny_hf.plain_tokenizer())


@pytest.fixture(scope="session")
def no_template_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has no chat template."""
    return tiny_hf.save_tiny_llama(tmp_path_factory.mktemp("no-template-llama"),
                                   tiny_hf.plain_tokenizer(chat_template=None))


@pytest.fixture(scope="module")
def clip_vlm(tiny_llama_dir, tiny_clip_dir):
    """The tiny Llama + tiny CLIP (penultimate layer, CLS dropped) + a seeded 2-layer bridge, in eval mode."""
    from lmmkit.models.build import build_vlm

    return build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-2).eval()


@pytest.fixture(scope="module")
def gpt2_vlm(tiny_gpt2_dir, tiny_clip_dir):
    """The tiny GPT-2 + tiny CLIP, in eval mode."""
    from lmmkit.models.build import build_vlm

    return build_vlm(str(tiny_gpt2_dir), str(tiny_clip_dir), vision_select_layer=-2).eval()


@pytest.fixture
def images():
    """Three small, distinct RGB images of a size other than the tower's (so the processor resizes)."""
    from PIL import Image

    return [Image.effect_noise((40, 48), 60 + 20 * k).convert("RGB") for k in range(3)]

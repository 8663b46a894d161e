"""Tiny HF checkpoints on disk for the model tests (built with save_pretrained; no hub)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_tiny_hf():
    """tests/models/tiny_hf.py, imported once by path (it is shared with tests/train)."""
    name = "lmmkit_tests_tiny_hf"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiny_hf.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny_hf = load_tiny_hf()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster than two threads on a busy machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A LlamaForCausalLM (hidden 32, 2 layers, 2 heads) + train_tokenizer's tokenizer (has <image>, ChatML)."""
    return tiny_hf.save_tiny_llama(tmp_path_factory.mktemp("llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A GPT-2 (absolute positions: left padding must get position ids right) + the same tokenizer."""
    return tiny_hf.save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tiny_hf.save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    return tiny_hf.save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


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

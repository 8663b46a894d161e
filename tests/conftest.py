"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_hf.py: tiny HF checkpoint builders

import tiny_hf  # noqa: E402

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


@pytest.fixture
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
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tiny_hf.save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    return tiny_hf.save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


ORACLES = Path(__file__).resolve().parents[1].parent / "shared" / "oracles"


@pytest.fixture(scope="session")
def oracles_dir() -> Path:
    """../shared/oracles (official scorers' numbers on released predictions); skip when absent."""
    if not ORACLES.is_dir():
        pytest.skip(f"no oracle data at {ORACLES} (CI has it; it is never copied into the repo)")
    return ORACLES


@pytest.fixture(scope="session")
def shipped_checkpoint(tmp_path_factory) -> Path:
    """An lmmkit checkpoint from the shipped parts with an untrained bridge: for tests of what runs a
    model (harness, server), not of its answers."""
    from lmmkit.config import config_from_dict, config_to_dict
    from lmmkit.models.build import build_vlm
    from lmmkit.train.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "checkpoint-0"
    cfg = config_to_dict(config_from_dict({"model": {"llm": "shipped:lm", "vision": "shipped:vision"},
                                           "train": {"stage": "align", "output_dir": str(out.parent)}}, source="test"))
    save_checkpoint(out, build_vlm("shipped:lm", "shipped:vision"), ("bridge",), cfg, {"step": 0})
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """Slow end-to-end tests first, longest first (`@pytest.mark.slow(minutes=N)`, else 1): under `pytest -n 2`
    (make test) the longest then starts at once on one worker while the other works through the rest, instead
    of starting late and leaving a worker idle at the end."""
    def order(item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -(slow.kwargs.get("minutes", 1) if slow else 0)

    items.sort(key=order)

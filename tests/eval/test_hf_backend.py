"""HFImageTextBackend on tiny Llava / LlavaNext folders built here with save_pretrained (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lmmkit import IMAGE_TOKEN
from lmmkit.eval.backends.base import Backend, BackendError, GenerationSettings, Request
from lmmkit.eval.backends.hf_model import HFImageTextBackend
from tiny_hf import BUILDERS, save_tiny_llava

# ChatML whose user content is a list: each image entry becomes "<image>\n", which the processor then
# expands to the vision tower's patch count.

GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param), tiny_tokenizer)


@pytest.fixture(scope="module")
def backend(model_dir) -> HFImageTextBackend:
    return HFImageTextBackend(model_dir, batch_size=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three small PNGs of different colours and sizes (LlavaNext picks a different grid for the wide one)."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (colour, size) in enumerate([("red", (32, 32)), ("blue", (64, 32)), ("green", (40, 40))]):
        paths.append(folder / f"{i}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    return paths


def _requests(images: list[Path]) -> list[Request]:
    return [
        Request("What is in the picture?", [images[0]]),
        Request("Describe the image briefly.", [images[1]]),
        Request("How many people are there?"),  # text only
        Request("What colour is the car?", [images[2], images[0]]),  # two images
        Request("A cat sitting on a red mat.", [Image.new("RGB", (32, 32), "white")]),  # in-memory PIL
    ]


def test_loads_and_answers_strings(backend, model_dir, images):
    assert isinstance(backend, Backend)
    assert backend.name == f"hf:{model_dir.name}"
    assert backend.processor.tokenizer.padding_side == "left"
    prompt = backend.prompt_text(Request("Hi?", [images[0]]))
    assert prompt.count(IMAGE_TOKEN) == 1 and prompt.endswith("<|im_start|>assistant\n")
    answers = backend.generate(_requests(images), GREEDY)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    assert any(answers), "a random tiny model still says something"


def test_batched_equals_one_at_a_time(backend, images):
    requests = _requests(images)
    batched = backend.generate(requests, GREEDY)  # batches of 4 then 1, mixed prompt lengths
    single = [backend.generate([r], GREEDY)[0] for r in requests]
    assert batched == single
    assert len(set(batched)) > 1, "answers should depend on the input, or this test proves nothing"


def test_sampling_runs(backend, images):
    answers = backend.generate(_requests(images)[:2], GenerationSettings(max_new_tokens=4, temperature=1.0))
    assert all(isinstance(a, str) for a in answers)


def test_missing_image_fails_only_its_item(backend, images, tmp_path):
    missing = tmp_path / "nope.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    requests = _requests(images)
    mixed = [requests[0], Request("Where?", [missing]), requests[1], Request("Why?", [images[0], broken])]
    answers = backend.generate(mixed, GREEDY)
    assert isinstance(answers[1], BackendError) and "nope.png" in str(answers[1])
    assert isinstance(answers[3], BackendError) and "broken.png" in str(answers[3])
    assert answers[0] == backend.generate([requests[0]], GREEDY)[0]
    assert answers[2] == backend.generate([requests[1]], GREEDY)[0]


def test_fingerprint_stable_and_tracks_weights(model_dir, backend, tmp_path, tiny_tokenizer):
    again = HFImageTextBackend(model_dir)
    assert again.fingerprint() == backend.fingerprint() and backend.fingerprint().endswith("torch.float32")
    # Same architecture and config, different weights (another seed), same folder name.
    kind = "llava_next" if "llava_next" in model_dir.name else "llava"
    other = BUILDERS[kind](tmp_path / model_dir.name, tiny_tokenizer, seed=1)
    retrained = HFImageTextBackend(other)
    assert retrained.name == backend.name
    assert retrained.fingerprint() != backend.fingerprint()


def test_plain_causal_lm_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="not an image-text-to-text model") as err:
        HFImageTextBackend(tiny_llama_dir)
    assert str(tiny_llama_dir) in str(err.value)


def test_processor_without_chat_template_is_rejected(tmp_path, tiny_tokenizer):
    folder = save_tiny_llava(tmp_path / "llava", tiny_tokenizer)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        HFImageTextBackend(folder)

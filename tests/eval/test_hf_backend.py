"""HFImageTextBackend on tiny Llava / LlavaNext folders built here with save_pretrained (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

import tiny_hf
from lmmkit import IMAGE_TOKEN
from lmmkit.eval.backends.base import Backend, BackendError, GenerationSettings, Request
from lmmkit.eval.backends.hf_model import HFImageTextBackend

# ChatML whose user content is a list: each image entry becomes "<image>\n", which the processor then
# expands to the vision tower's patch count.
LIST_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0)


def _configs(tokenizer, seed: int) -> tuple[CLIPVisionConfig, LlamaConfig]:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=tiny_hf.IMAGE_SIZE, patch_size=tiny_hf.PATCH, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    # Wide init so logits are peaked: greedy ties (which could flip between batched/single) are unlikely.
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    return vision, text


def save_tiny_llava(folder: Path, tokenizer, seed: int = 0) -> Path:
    """LlavaForConditionalGeneration (CLIP 32px/patch 8, Llama 32 wide) + LlavaProcessor, in `folder`.

    "default" feature selection drops CLS: 16 image tokens, which the processor reproduces from
    patch_size=8 and num_additional_image_tokens=1 (CLS) minus the dropped one.
    """
    vision, text = _configs(tokenizer, seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": tiny_hf.IMAGE_SIZE},
                                            crop_size={"height": tiny_hf.IMAGE_SIZE, "width": tiny_hf.IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tiny_hf.PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LIST_CHAT_TEMPLATE).save_pretrained(folder)
    return Path(folder)


def save_tiny_llava_next(folder: Path, tokenizer, seed: int = 0) -> Path:
    """LlavaNextForConditionalGeneration with anyres grids of 32px tiles + LlavaNextProcessor, in `folder`."""
    vision, text = _configs(tokenizer, seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    size = tiny_hf.IMAGE_SIZE
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             image_grid_pinpoints=pinpoints)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tiny_hf.PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LIST_CHAT_TEMPLATE).save_pretrained(folder)
    return Path(folder)


BUILDERS = {"llava": save_tiny_llava, "llava_next": save_tiny_llava_next}


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

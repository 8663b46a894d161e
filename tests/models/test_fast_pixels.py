"""The input-size fast path gives the processor's pixels bit for bit, and stands aside whenever it could not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessorPil,
    LlavaNextImageProcessorPil,
    SiglipImageProcessorPil,
)

from lmmkit.models.fast_pixels import fast_pixels
from lmmkit.models.parts import part_path


def _images(side: int, n: int = 5, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}),
    "clip-openai-stats-no-crop": lambda: CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False),
    "normalise-only": lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                    do_rescale=False),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_same_pixels_as_the_processor(name):
    processor = PROCESSORS[name]()
    images = _images(32)
    fast = fast_pixels(images, processor)
    assert fast is not None and fast.dtype == torch.float32
    assert torch.equal(fast, processor(images=images, return_tensors="pt")["pixel_values"])


def test_the_shipped_towers_processor_takes_the_fast_path_exactly():
    processor = AutoImageProcessor.from_pretrained(part_path("vision"))
    images = _images(64, seed=3)
    fast = fast_pixels(images, processor)
    assert fast is not None
    assert torch.equal(fast, processor(images=images, return_tensors="pt")["pixel_values"])


def test_it_stands_aside_when_the_processor_would_change_the_image():
    clip = PROCESSORS["clip"]()
    assert fast_pixels(_images(40), clip) is None  # resize + crop do something
    assert fast_pixels(_images(32) + _images(33, n=1), clip) is None  # one image of another size is enough
    assert fast_pixels([im.convert("L") for im in _images(32)], clip) is None
    assert fast_pixels([], clip) is None
    longest = CLIPImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64},
                                    crop_size={"height": 32, "width": 32})
    assert fast_pixels(_images(32), longest) is None
    assert fast_pixels(_images(32), CLIPImageProcessorPil(size={"shortest_edge": 32}, do_pad=True,
                                                          crop_size={"height": 32, "width": 32})) is None
    # A processor with its own preprocessing (LlavaNext tiles) is never second-guessed.
    assert fast_pixels(_images(32), LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                                               crop_size={"height": 32, "width": 32})) is None


def test_vision_tower_preprocess_is_unchanged_for_any_mix_of_images(tiny_clip_dir):
    from lmmkit.models.vision import VisionTower

    tower = VisionTower.from_pretrained(tiny_clip_dir)
    for images in (_images(32), _images(32) + _images(50, n=2), [im.convert("L") for im in _images(32)]):
        expected = tower.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        assert torch.equal(tower.preprocess(images), expected)

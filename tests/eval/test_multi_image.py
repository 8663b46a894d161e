"""Prompts with several images (the image-order attack twins, RTVLM's visual order): one placeholder per image,
in order, through `generate_multi` and the lmmkit backend."""

from __future__ import annotations

import pytest

from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.world import World
from lmmkit.eval.backends.base import GenerationSettings, Request
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.generation import answer_questions, generate_multi
from lmmkit.train.features import FeatureCache


@pytest.fixture(scope="module")
def model():
    from lmmkit.models.build import build_vlm

    return build_vlm("shipped:lm", "shipped:vision", seed=0)


def test_several_images_per_prompt_match_the_one_image_path(model, one_torch_thread):
    import random

    rng = random.Random(0)
    images = [render_scene(World().sample_scene(rng, f"s{i}", held_out=False)) for i in range(3)]
    questions = ["How many objects are there?", "Is there a red circle in the image?"]
    one = [(im, q) for im in images[:2] for q in questions]
    want = answer_questions(model, one, max_new_tokens=6, progress=False)
    assert generate_multi(model, [([im], q) for im, q in one], FeatureCache(), max_new_tokens=6) == want
    two = generate_multi(model, [(images[:2], "Is there a red circle in the first image?"),
                                 ([images[2]], questions[0]), (images[1:], questions[1])], FeatureCache(), 6)
    assert len(two) == 3 and all(isinstance(x, str) for x in two)
    backend = LmmkitBackend(model, "test", progress=False)
    requests = [Request(q, [im]) for im, q in one] + [Request(questions[0], images[:2])]
    got = backend.generate(requests, GenerationSettings(max_new_tokens=6))
    assert got[:4] == LmmkitBackend(model, "test", progress=False).generate(requests[:4],
                                                                            GenerationSettings(max_new_tokens=6))
    assert isinstance(got[4], str)

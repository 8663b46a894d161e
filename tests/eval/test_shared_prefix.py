"""Evaluation that runs each image's shared prompt start through the LLM once gives the unshared answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmmkit.eval.generation import answer_questions, prompt_ids
from lmmkit.eval.shared_prefix import shared_prefixes
from lmmkit.models.build import build_vlm
from lmmkit.train.features import FeatureCache

QUESTIONS = ["Is there a red circle in the image?", "Is there a blue square in the image?",
             "Is there an orange star in the image?", "Describe the image briefly.", "How many objects are there?",
             "What colour is the square?"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")


def test_shared_prefix_lengths():
    image = 9
    ids = [[1, 2, image, image, 5, 6, 7], [1, 2, image, image, 5, 8], [1, 2, image, image, 5, 6, 7]]
    assert shared_prefixes(ids, [[0, 1]], image) == [5]
    assert shared_prefixes(ids, [[0, 2]], image) == [6]  # identical prompts keep their last token to prefill
    assert shared_prefixes(ids, [[0], [1]], image) == [6, 5]
    assert shared_prefixes([[1, image, 3], [1, 4, image]], [[0, 1]], image) is None  # an image past the split


@pytest.mark.parametrize("anyres", [False, True])
def test_shared_prefixes_give_the_unshared_answers(tiny_clip_dir, anyres):
    """The shipped LM (pretrained: peaked, multi-token answers) on a tiny CLIP; six questions per image, batches
    that split an image's questions, an image asked once, and (AnyRes) images with different token counts."""
    extra = {"anyres": True, "anyres_grid_pinpoints": "32x64,64x32,64x64"} if anyres else {}
    model = build_vlm("shipped:lm", str(tiny_clip_dir), -2, seed=3, **extra).eval()
    sizes = [(40, 90), (64, 64), (100, 30), (32, 32)]
    images = [_image(size, seed) for seed, size in enumerate(sizes)]
    items = [(im, q) for im in images[:3] for q in QUESTIONS] + [(images[3], QUESTIONS[0])]
    prefills: list[tuple[int, int]] = []
    model.llm.register_forward_pre_hook(
        lambda _m, _a, kw: prefills.append(tuple(kw["inputs_embeds"].shape[:2])) if "inputs_embeds" in kw else None,
        with_kwargs=True)
    cache = FeatureCache()
    shared = answer_questions(model, items, batch_size=8, max_new_tokens=10, cache=cache, progress=False)
    shared_prefills = list(prefills)
    prefills.clear()
    plain = answer_questions(model, items, batch_size=8, max_new_tokens=10, cache=cache, progress=False,
                             share_prefixes=False)
    assert shared == plain
    assert len({a for a in plain}) > 2 and any(len(a.split()) > 1 for a in plain)  # real, varied answers
    # Sharing happened: the image-bearing prefill has one row per image of the batch, not one per question.
    assert [rows for rows, _ in shared_prefills] == [2, 2, 2]  # images 0+1, 1+2, 2+3 across batches of 8
    assert [rows for rows, _ in prefills] == [8, 8, 3]
    lengths = [len(prompt_ids(model, q, image=im)) for im, q in items]
    assert sum(r * w for r, w in shared_prefills) < sum(lengths) / 2


def test_a_cross_attention_model_answers_as_before(tiny_llama_dir, tiny_clip_dir):
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, bridge="cross-attention").eval()
    items = [(_image((32, 32), 0), q) for q in QUESTIONS[:3]]
    with torch.no_grad():
        assert answer_questions(model, items, max_new_tokens=4, progress=False) == \
            answer_questions(model, items, max_new_tokens=4, progress=False, share_prefixes=False)


def test_the_harness_backend_shares_prefixes_with_the_same_answers(tiny_clip_dir):
    from lmmkit.eval.backends.base import GenerationSettings, Request
    from lmmkit.eval.backends.lmmkit_model import LmmkitBackend

    model = build_vlm("shipped:lm", str(tiny_clip_dir), -2, seed=3).eval()
    images = [_image((32, 32), seed) for seed in range(3)]
    requests = [Request(q, [im]) for q in QUESTIONS for im in images] + [Request("How many objects are there?")]
    rows: list[int] = []
    model.llm.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["inputs_embeds"].shape[0]) if "inputs_embeds" in kw else None,
        with_kwargs=True)
    backend = LmmkitBackend(model, fingerprint="test", batch_size=8, progress=False)
    answers = backend.generate(requests, GenerationSettings(max_new_tokens=10))
    expected = answer_questions(model, [(r.images[0], r.prompt) for r in requests[:-1]], max_new_tokens=10,
                                progress=False, share_prefixes=False)
    assert answers[:-1] == expected and isinstance(answers[-1], str)
    assert rows[0] == 2  # the first batch (6 + 2 questions about two images) prefills two rows, not eight

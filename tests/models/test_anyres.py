"""AnyRes as an lmmkit model: variable visual-token counts per image through the splice, the feature cache,
batched generation, the eval backend, DPO batches and data encoding (tiny CLIP: 32 px views, 16 features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmmkit import IMAGE_TOKEN
from lmmkit.data.check import BadRecordCounter
from lmmkit.data.collate import pad_batch
from lmmkit.data.dataset import encode_records
from lmmkit.data.preference import PreferenceRecord, encode_preferences
from lmmkit.data.schema import ConversationRecord, Message
from lmmkit.eval.backends.base import GenerationSettings, Request
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.generation import answer_questions, prompt_ids
from lmmkit.models.build import build_vlm
from lmmkit.models.highres import anyres_token_count
from lmmkit.models.vlm import ImageTokenMismatchError
from lmmkit.train.dpo import make_pair_batch
from lmmkit.train.features import FeatureCache
from lmmkit.train.stages import apply_stage

GRID = [(32, 64), (64, 32), (64, 64)]
SIZES = [(40, 90), (64, 64), (100, 30)]  # (height, width): 52, 88 and 40 tokens
QUESTION = "What is in the picture?"


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def model(tiny_llama_dir, tiny_clip_dir):
    return build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, anyres=True,
                     anyres_grid_pinpoints="32x64,64x32,64x64").eval()


def test_token_counts_follow_the_image_size(model, clip_vlm, tmp_path):
    images = [_image(size, k) for k, size in enumerate(SIZES)]
    paths = []
    for k, image in enumerate(images):
        paths.append(tmp_path / f"{k}.png")
        image.save(paths[-1])
    expected = [anyres_token_count(size, GRID, 32, 8) for size in SIZES]
    assert expected == [52, 88, 40] and model.tokens_per_image is None
    assert model.image_token_counts(images) == model.image_token_counts(paths) == expected
    assert model.image_sizes(paths) == SIZES
    # A fixed-count model: every image costs tokens_per_image, and no file is opened (these do not exist).
    assert clip_vlm.image_token_counts(["missing.png"] * 2) == [16, 16]
    assert clip_vlm.image_sizes(["missing.png"]) is None
    with pytest.raises(ValueError, match="pass image="):
        prompt_ids(model, QUESTION)


def test_embed_takes_per_image_features_and_checks_their_count(model):
    images = [_image(size, k) for k, size in enumerate(SIZES[:2])]
    rows = [prompt_ids(model, QUESTION, image=im) for im in images]
    batch = pad_batch([(x, x) for x in rows], model.tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = model.encode_images(model.vision.preprocess(images), image_sizes=SIZES[:2])
        assert [e.shape for e in embeds] == [(52, 32), (88, 32)]
        as_list = model.embed(batch["input_ids"], embeds)
        flat = model.embed(batch["input_ids"], torch.cat(embeds))
        assert torch.equal(as_list, flat)
        is_image = batch["input_ids"] == model.image_token_id
        assert torch.equal(as_list[0][is_image[0]], embeds[0]) and torch.equal(as_list[1][is_image[1]], embeds[1])
        with pytest.raises(ImageTokenMismatchError) as err:
            model.embed(batch["input_ids"], embeds[:1], sample_ids=["rec-a", "rec-b"])
        with pytest.raises(ValueError, match="pass image_sizes"):
            model.encode_images(model.vision.preprocess(images))
    message = str(err.value)
    assert "140 image placeholder tokens" in message and "52 features" in message
    assert "rec-a: 52" in message and "rec-b: 88" in message
    assert "First sample that does not fit: rec-b (88 placeholders; its images give none left)" in message
    with torch.no_grad(), pytest.raises(ImageTokenMismatchError, match=r"rec-a \(52 placeholders; its images give 88"):
        model.embed(batch["input_ids"], embeds[::-1], sample_ids=["rec-a", "rec-b"])  # images in the wrong order


def test_batched_answers_with_mixed_sizes_equal_one_by_one(model):
    """eval generation: one left-padded batch of images with different token counts, from the feature cache."""
    items = [(_image(size, 10 + k), q) for k, size in enumerate(SIZES) for q in (QUESTION, "How many?")]
    cache = FeatureCache()
    batched = answer_questions(model, items, batch_size=6, max_new_tokens=8, cache=cache, progress=False)
    assert {v.shape[0] for v in cache.features.values()} == {3, 5}  # views per image: entries of several shapes
    with pytest.raises(RuntimeError):
        cache.stack([im for im, _ in items])  # the fixed-shape fast path cannot hold them; cat can
    assert cache.cat([im for im, _ in items[:2]]).shape[0] == 6
    single = [answer_questions(model, [item], max_new_tokens=8, cache=cache, progress=False)[0] for item in items]
    assert batched == single and all(batched)
    backend = LmmkitBackend(model, "fp", batch_size=6, progress=False, features=cache)
    requests = [Request(q, [im]) for im, q in items] + [Request("Say hi.", [])]
    answers = backend.generate(requests, GenerationSettings(max_new_tokens=8))
    assert answers[:-1] == batched and isinstance(answers[-1], str)


def test_image_newline_trains_with_the_bridge(model):
    counts = apply_stage(model, "align", verbose=False)
    try:
        assert model.bridge.image_newline.requires_grad and counts["vision"] == 0
        assert counts["bridge"] == sum(p.numel() for p in model.bridge.inner.parameters()) + 32
    finally:
        model.requires_grad_(False)
        model.eval()


def test_encoding_counts_per_image_and_skips_unreadable_images(model, tmp_path):
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    _image((100, 30)).save(good)
    broken.write_bytes(b"not a png")

    def record(rid: str, path) -> ConversationRecord:
        return ConversationRecord(rid, [Message("user", f"{IMAGE_TOKEN}\n{QUESTION}"), Message("assistant", "Noise.")],
                                  [path], source="t.json")

    counter = BadRecordCounter()
    samples = encode_records([record("a", good), record("b", broken)], model.tokenizer, model.image_token_id,
                             model.image_token_counts, 512, counter)
    assert [s.id for s in samples] == ["a"] and samples[0].input_ids.count(model.image_token_id) == 40
    assert counter.total == 1 and "corrupt image" in counter.summary()

    pref = PreferenceRecord("p", [Message("user", f"{IMAGE_TOKEN}\n{QUESTION}")], "Noise.", "A cat.", [good])
    pairs = encode_preferences([pref], model.tokenizer, model.image_token_id, model.image_token_counts, 512,
                               BadRecordCounter(), "stop")
    assert pairs[0].chosen.input_ids.count(model.image_token_id) == 40
    assert pairs[0].rejected.input_ids.count(model.image_token_id) == 40


def test_dpo_pair_batch_repeats_views_and_sizes(model, tmp_path):
    paths = []
    for k, size in enumerate(SIZES[:2]):
        paths.append(tmp_path / f"{k}.png")
        _image(size, k).save(paths[-1])
    records = [PreferenceRecord(f"p{k}", [Message("user", f"{IMAGE_TOKEN}\n{QUESTION}")], "Noise.", "A cat.", [p])
               for k, p in enumerate(paths)]
    pairs = encode_preferences(records, model.tokenizer, model.image_token_id, model.image_token_counts, 512,
                               BadRecordCounter(), "stop")
    batch = make_pair_batch(model, pairs, None, model.tokenizer.pad_token_id)
    assert batch["image_sizes"] == SIZES[:2] * 2
    assert batch["vision_features"].shape[0] == 2 * (3 + 5)  # the views of both images, twice
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # Chosen and rejected rows of a pair share the prompt, image included: same logits up to the answers.
    ids = batch["input_ids"]
    shared = int((ids[0] != ids[2]).nonzero()[0])
    assert shared > 52
    torch.testing.assert_close(logits[0, :shared], logits[2, :shared], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, :shared], logits[3, :shared], rtol=0, atol=1e-5)
    # ... and each row sees its own image: row 1 (the second image) equals that image run alone.
    n = int(batch["attention_mask"][1].sum())
    with torch.no_grad():
        alone = model(input_ids=ids[1:2, :n], pixel_values=model.vision.preprocess([Image.open(paths[1])]),
                      image_sizes=[SIZES[1]]).logits
    torch.testing.assert_close(logits[1, :n], alone[0], rtol=0, atol=1e-5)


def test_anyres_max_caps_the_tokens_and_the_features_match(tiny_llama_dir, tiny_clip_dir):
    capped = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, anyres=True,
                       anyres_grid_pinpoints="32x32,64x64,96x96", anyres_max=1).eval()
    image = _image((96, 96))
    # A 3x3 grid of 4x4-patch tiles is 12x12 features; the cap of one tile's worth (4x4) downsamples it.
    counts = capped.image_token_counts([image])
    assert counts == [anyres_token_count((96, 96), [(32, 32), (64, 64), (96, 96)], 32, 8, anyres_max=1)] == [16 + 16 + 4]
    ids = torch.tensor([prompt_ids(capped, QUESTION, image=image)])
    with torch.no_grad():  # the packed features fill exactly the expanded placeholders
        out = capped(input_ids=ids, pixel_values=capped.vision.preprocess([image]), image_sizes=[(96, 96)])
    assert out.logits.shape[1] == ids.shape[1]

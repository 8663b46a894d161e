"""VisionLanguageModel on tiny HF checkpoints: tower outputs, the splice, the count check, generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from lmmkit.data.collate import pad_batch
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.build import build_vlm
from lmmkit.models.vision import VisionTower
from lmmkit.models.vlm import ImageTokenMismatchError

PATCHES = 16  # 32 px images, 8 px patches


# ---- vision towers ----------------------------------------------------------------------------
def test_clip_tower_drops_cls_and_selects_the_penultimate_layer(tiny_clip_dir, images):
    tower = VisionTower.from_pretrained(tiny_clip_dir, select_layer=-2)
    assert tower.num_tokens() == PATCHES
    pixels = tower.preprocess(images[:2])
    assert pixels.shape == (2, 3, 32, 32)

    reference = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = tower.eval()(pixels)
    assert feats.shape == (2, PATCHES, 32)
    torch.testing.assert_close(feats, hidden[-2][:, 1:])
    # Not the last layer, and not with the CLS token kept.
    assert not torch.allclose(feats, hidden[-1][:, 1:], atol=1e-3)

    with_cls = VisionTower.from_pretrained(tiny_clip_dir, select_layer=-2, drop_cls=False).eval()
    assert with_cls.num_tokens() == PATCHES + 1
    with torch.no_grad():
        torch.testing.assert_close(with_cls(pixels), hidden[-2])


def test_siglip_tower_keeps_every_token(tiny_siglip_dir, images):
    tower = VisionTower.from_pretrained(tiny_siglip_dir, select_layer=-1).eval()
    assert not tower.has_cls
    assert tower.num_tokens() == PATCHES
    pixels = tower.preprocess(images[:2])
    reference = SiglipVisionModel.from_pretrained(tiny_siglip_dir).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(tower(pixels), hidden[-1])


def test_vlm_tokens_per_image_follows_the_tower(tiny_llama_dir, tiny_clip_dir, tiny_siglip_dir):
    assert build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2).tokens_per_image == PATCHES
    assert build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, vision_drop_cls=False).tokens_per_image == 17
    assert build_vlm(str(tiny_llama_dir), str(tiny_siglip_dir), -1).tokens_per_image == PATCHES


# ---- splice -----------------------------------------------------------------------------------
def _ids_with_images(model, layout: list[tuple[int, ...]]) -> torch.Tensor:
    """Rows of ordinary token ids with image placeholder runs: layout entries are per-row token
    counts alternating text, image, text, ... (image runs written as negative counts)."""
    img = model.image_token_id
    rows = []
    for row in layout:
        ids: list[int] = []
        for k, n in enumerate(row):
            if n < 0:
                ids += [img] * -n
            else:
                ids += [10 + (7 * k + j) % 50 for j in range(n)]
        rows.append(ids)
    assert len({len(r) for r in rows}) == 1, "rows must be the same length"
    return torch.tensor(rows)


def test_embed_puts_image_features_exactly_at_the_placeholders(clip_vlm, images):
    model = clip_vlm
    # Row 0: text, one image, text. Row 1: two images with text between them.
    ids = _ids_with_images(model, [(3, -PATCHES, 2 + PATCHES + 4), (1, -PATCHES, 3, -PATCHES, 5)])
    with torch.no_grad():
        pixels = model.vision.preprocess(images)
        image_embeds = model.encode_images(pixel_values=pixels)
        embeds = model.embed(ids, image_embeds)
        table = model.llm.get_input_embeddings().weight

    assert image_embeds.shape == (3, PATCHES, model.llm.config.hidden_size)
    torch.testing.assert_close(image_embeds, model.bridge(model.vision(pixels)))
    is_image = ids == model.image_token_id
    # The image rows, read in order (row-major), are the bridged features of image 0, 1, 2 in order.
    torch.testing.assert_close(embeds[is_image], image_embeds.reshape(-1, image_embeds.shape[-1]), rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, 3:3 + PATCHES], image_embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, 1:1 + PATCHES], image_embeds[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, 4 + PATCHES:4 + 2 * PATCHES], image_embeds[2], rtol=0, atol=0)
    # Text rows are the embedding table's rows.
    torch.testing.assert_close(embeds[~is_image], table[ids[~is_image]], rtol=0, atol=0)


def test_text_only_batch_is_the_plain_embedding(clip_vlm):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(clip_vlm.embed(ids, None), clip_vlm.llm.get_input_embeddings()(ids))


def test_one_placeholder_too_few_raises_naming_the_sample(clip_vlm, images):
    model = clip_vlm
    ids = _ids_with_images(model, [(2, -PATCHES, 3), (3, -(PATCHES - 1), 3)])
    pixels = model.vision.preprocess(images[:2])
    with torch.no_grad():
        image_embeds = model.encode_images(pixel_values=pixels)
        with pytest.raises(ImageTokenMismatchError) as info:
            model.embed(ids, image_embeds, sample_ids=["coco-0001", "coco-0042"])
    message = str(info.value)
    assert "coco-0042" in message
    assert "coco-0001" not in message  # the good sample is not blamed
    assert f"{2 * PATCHES - 1} image placeholder tokens" in message
    # forward reports it the same way.
    with torch.no_grad(), pytest.raises(ImageTokenMismatchError, match="coco-0042"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
              sample_ids=["coco-0001", "coco-0042"])
    # Images without any placeholders are a mismatch too.
    with torch.no_grad(), pytest.raises(ImageTokenMismatchError):
        model.embed(torch.tensor([[5, 6, 7]]), image_embeds[:1])


# ---- generation -------------------------------------------------------------------------------
def _left_padded_prompts(model, images):
    questions = ["What is in the picture?", "How many people are there near the tree in this one?"]
    ids = [prompt_ids(model, q) for q in questions]
    assert len(ids[0]) != len(ids[1])
    batch = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
    pixels = model.vision.preprocess(images[:2])
    return ids, batch, pixels


def _greedy_without_cache(model, input_ids, attention_mask, pixels, steps: int):
    """Re-run the full forward every step (no KV cache). Returns each row's tokens cut at eos, and
    the last-position logits of every step."""
    step_logits = []
    with torch.no_grad():
        prompt = model.embed(input_ids, model.encode_images(pixel_values=pixels))
        table = model.llm.get_input_embeddings()
        mask = attention_mask.clone()
        generated = torch.empty(input_ids.shape[0], 0, dtype=torch.long)
        for _ in range(steps):
            embeds = torch.cat([prompt, table(generated)], dim=1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
            step_logits.append(logits[:, -1])
            token = logits[:, -1].argmax(-1)
            generated = torch.cat([generated, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    eos = model.tokenizer.eos_token_id
    rows = []
    for row in generated.tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows, step_logits


def _logits_of_each_call(model):
    """Record the last-position logits of every LLM call (a forward hook); returns (list, handle)."""
    seen = []
    handle = model.llm.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].clone()))
    return seen, handle


LLMS = pytest.mark.parametrize("vlm", ["clip_vlm", "gpt2_vlm"])  # RoPE and absolute positions


@LLMS
def test_greedy_with_kv_cache_equals_full_recompute(vlm, images, request):
    model = request.getfixturevalue(vlm)
    _, batch, pixels = _left_padded_prompts(model, images)
    steps = 10
    seen, handle = _logits_of_each_call(model)
    try:
        cached = model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pixels,
                                max_new_tokens=steps)
    finally:
        handle.remove()
    reference, ref_logits = _greedy_without_cache(model, batch["input_ids"], batch["attention_mask"], pixels, steps)
    assert cached == reference
    # Not just the same argmax: the same distributions at every step the cached loop ran.
    assert len(seen) >= 2
    for step, (logits, expected) in enumerate(zip(seen, ref_logits, strict=False)):
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    assert any(len(row) > 1 for row in cached), "the comparison must cover several decoding steps"


@LLMS
def test_left_padding_does_not_change_a_rows_answer(vlm, images, request):
    model = request.getfixturevalue(vlm)
    ids, batch, pixels = _left_padded_prompts(model, images)
    seen, handle = _logits_of_each_call(model)
    try:
        together = model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pixels,
                                  max_new_tokens=8)
        batched_logits = list(seen)
        for i, row_ids in enumerate(ids):
            seen.clear()
            alone = model.generate(torch.tensor([row_ids]), torch.ones(1, len(row_ids), dtype=torch.long),
                                   pixel_values=pixels[i:i + 1], max_new_tokens=8)
            assert alone[0] == together[i]
            for step in range(min(len(seen), len(together[i]) + 1)):
                torch.testing.assert_close(seen[step][0], batched_logits[step][i], rtol=1e-4, atol=1e-5,
                                           msg=f"row {i} step {step}")
    finally:
        handle.remove()


def test_seeded_sampling_is_reproducible_and_temperature_zero_is_greedy(clip_vlm, images):
    model = clip_vlm
    _, batch, pixels = _left_padded_prompts(model, images)
    args = (batch["input_ids"], batch["attention_mask"])
    # eos can come early when sampling from a random model; ignore it here to compare whole runs.
    model_tok = model.tokenizer
    model.tokenizer = SimpleNamespace(eos_token_id=-1)
    try:
        def sample(seed, **kw):
            return model.generate(*args, pixel_values=pixels, max_new_tokens=12,
                                  generator=torch.Generator().manual_seed(seed), **kw)

        first, again, other = sample(0, temperature=1.0), sample(0, temperature=1.0), sample(1, temperature=1.0)
        assert first == again
        assert first != other
        greedy = model.generate(*args, pixel_values=pixels, max_new_tokens=12)
        assert first != greedy
        assert sample(0, temperature=0.0) == greedy
        # top_p so small that only the most likely token survives is greedy too.
        assert sample(3, temperature=1.0, top_p=1e-6) == greedy
    finally:
        model.tokenizer = model_tok


def test_generation_stops_at_eos(clip_vlm, images, monkeypatch):
    model = clip_vlm
    ids, _, pixels = _left_padded_prompts(model, images)
    prompt = torch.tensor([ids[0]])
    mask = torch.ones_like(prompt)
    monkeypatch.setattr(model, "tokenizer", SimpleNamespace(eos_token_id=-1))  # never generated
    free = model.generate(prompt, mask, pixel_values=pixels[:1], max_new_tokens=12)[0]
    assert len(free) == 12
    # Make a token that the model produces mid-answer the end-of-turn token.
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    monkeypatch.setattr(model, "tokenizer", SimpleNamespace(eos_token_id=free[k]))
    calls = []
    hook = model.llm.register_forward_hook(lambda *_: calls.append(1))
    try:
        stopped = model.generate(prompt, mask, pixel_values=pixels[:1], max_new_tokens=12)[0]
    finally:
        hook.remove()
    assert stopped == free[:k]  # cut at eos, eos itself excluded
    assert len(calls) == k + 1  # prefill + one step per token before eos: decoding really stopped

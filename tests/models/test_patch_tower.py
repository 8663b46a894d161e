"""Fuyu-style encoder-free vision: PatchEmbedTower (raw patches, no weights) + FuyuBridge (linear + row breaks)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmmkit.data.check import BadRecordCounter
from lmmkit.data.collate import pad_batch
from lmmkit.data.dataset import encode_records
from lmmkit.data.schema import ConversationRecord, Message
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.bridges.fuyu import FuyuBridge
from lmmkit.models.highres import fuyu_token_count
from lmmkit.models.language import load_language_model
from lmmkit.models.patch_tower import PatchEmbedTower
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.checkpoint import load_trained_parts, save_checkpoint
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import make_batch
from lmmkit.train.stages import apply_stage


# ---- the tower ---------------------------------------------------------------------------------
def test_a_known_pixel_lands_in_the_expected_patch_slot():
    tower = PatchEmbedTower(canvas=(16, 24), patch_size=8)  # a 2 x 3 patch grid
    assert tower.grid == (2, 3) and tower.num_tokens() == 6 and tower.hidden_size == 192
    image = Image.new("RGB", (24, 16))  # black: every value -1 after normalising
    image.putpixel((20, 9), (255, 0, 51))  # x=20, y=9: patch row 1, col 2, offset dy=1, dx=4
    patches = tower(tower.preprocess([image]))
    assert patches.shape == (1, 6, 192)
    slot = 1 * 3 + 2
    base = (1 * 8 + 4) * 3
    assert patches[0, slot, base:base + 3].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1])
    rest = torch.ones_like(patches, dtype=torch.bool)
    rest[0, slot, base:base + 3] = False
    assert bool((patches[rest] == -1).all())


def test_patches_are_row_major_with_pixels_in_dy_dx_channel_order():
    tower = PatchEmbedTower(canvas=(16, 24), patch_size=4)
    pixels = torch.randn(2, 3, 16, 24)
    patches = tower(pixels)
    rows, cols = tower.grid
    for r, c, dy, dx, k in [(0, 0, 0, 0, 0), (3, 5, 3, 2, 1), (2, 1, 1, 3, 2), (1, 4, 0, 3, 0)]:
        assert torch.equal(patches[:, r * cols + c, (dy * 4 + dx) * 3 + k], pixels[:, k, r * 4 + dy, c * 4 + dx])
    # Every pixel appears exactly once.
    assert torch.equal(patches.flatten(1).sort().values, pixels.flatten(1).sort().values)


def test_preprocess_downscales_keeping_aspect_ratio_and_pads_bottom_right():
    tower = PatchEmbedTower()  # 64 x 64 canvas, patch 8 (ShapesWorld)
    wide = Image.new("RGB", (128, 64), (255, 255, 255))  # 2:1 -> 64 wide, 32 tall
    small = Image.new("RGB", (40, 24), (255, 255, 255))  # fits: kept at its size, never upscaled
    exact = Image.new("RGB", (64, 64), (0, 255, 0))
    pixels = tower.preprocess([wide, small, exact])
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == torch.float32
    assert bool((pixels[0, :, :32] == 1).all()) and bool((pixels[0, :, 32:] == -1).all())
    assert bool((pixels[1, :, :24, :40] == 1).all())
    assert bool((pixels[1, :, 24:] == -1).all()) and bool((pixels[1, :, :, 40:] == -1).all())
    assert bool((pixels[2, 1] == 1).all()) and bool((pixels[2, 0] == -1).all())
    assert tower.fit(Image.new("RGB", (100, 30))).size == (64, 19)  # int(30 * 0.64): Fuyu's truncation


def test_tower_has_no_parameters_and_checks_its_input():
    tower = PatchEmbedTower()
    assert list(tower.parameters()) == [] and tower.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        tower(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        PatchEmbedTower(canvas=(60, 64), patch_size=8)


def test_save_and_load_round_trip(tmp_path):
    tower = PatchEmbedTower(canvas=(32, 48), patch_size=16)
    tower.save_pretrained(tmp_path / "patches")
    again = PatchEmbedTower.from_pretrained(tmp_path / "patches")
    assert (again.canvas, again.patch_size, again.resample) == ((32, 48), 16, tower.resample)


# ---- the bridge --------------------------------------------------------------------------------
def test_row_breaks_sit_after_every_row_and_equal_the_learned_embedding():
    torch.manual_seed(0)
    rows, cols, dim = 3, 4, 16
    bridge = FuyuBridge(patch_dim=12, llm_dim=dim, rows=rows, cols=cols)
    patches = torch.randn(2, rows * cols, 12)
    out = bridge(patches)
    assert out.shape == (2, rows * (cols + 1), dim)
    breaks = torch.arange(cols, rows * (cols + 1), cols + 1)
    assert breaks.tolist() == [4, 9, 14]
    assert torch.equal(out[:, breaks], bridge.row_break.expand(2, rows, dim))
    keep = torch.ones(rows * (cols + 1), dtype=torch.bool)
    keep[breaks] = False
    torch.testing.assert_close(out[:, keep], bridge.proj(patches), rtol=0, atol=0)  # patches in order
    # The row break is learned: it gets gradient.
    out.sum().backward()
    assert bridge.row_break.grad is not None and bridge.row_break.grad.abs().sum() > 0


@pytest.mark.parametrize(("canvas", "patch"), [((64, 64), 8), ((32, 48), 8), ((30, 60), 30)])
def test_token_count_is_fuyus(canvas, patch):
    tower = PatchEmbedTower(canvas=canvas, patch_size=patch)
    bridge = FuyuBridge(tower.hidden_size, 8, *tower.grid)
    n = bridge.num_output_tokens(tower.num_tokens())
    assert n == fuyu_token_count(canvas, patch, canvas)
    # Any image larger than the canvas is downscaled onto it: the same count.
    big = (canvas[0] * 3, canvas[1] * 3)
    assert n == fuyu_token_count(big, patch, canvas)
    assert bridge(torch.zeros(1, tower.num_tokens(), tower.hidden_size)).shape[1] == n


def test_bridge_refuses_another_grid():
    with pytest.raises(ValueError, match=r"4x4 patch grid \(16 patches\) but the tower gives 20"):
        FuyuBridge(192, 8, 4, 4).num_output_tokens(20)


# ---- inside a VisionLanguageModel --------------------------------------------------------------
@pytest.fixture
def fuyu_vlm(tiny_llama_dir) -> VisionLanguageModel:
    llm, tokenizer = load_language_model(tiny_llama_dir)
    tower = PatchEmbedTower(canvas=(32, 32), patch_size=8)
    torch.manual_seed(0)
    bridge = FuyuBridge(tower.hidden_size, llm.config.hidden_size, *tower.grid)
    return VisionLanguageModel(tower, llm, tokenizer, bridge=bridge)


def _shape_images() -> list[Image.Image]:
    red, blue = Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 220))
    for im in (red, blue):
        for x in range(8, 24):
            for y in range(8, 24):
                im.putpixel((x, y), (240, 240, 240))
    return [red, blue]


def test_vlm_trains_a_few_steps_and_answers_from_the_image(fuyu_vlm, tmp_path):
    model = fuyu_vlm
    assert model.tokens_per_image == 4 * 5 == fuyu_token_count((32, 32), 8, (32, 32))
    counts = apply_stage(model, "full", verbose=False)  # the vision part has nothing to train
    assert counts["vision"] == 0 and counts["bridge"] == 192 * 32 + 32 + 32
    images = _shape_images()
    records = [ConversationRecord(f"s{i}", [Message("user", "<image>\nWhat colour is the square?"),
                                            Message("assistant", answer)], [im])
               for i, (im, answer) in enumerate(zip(images, ["The square is red.", "The circle is blue."],
                                                    strict=True))]
    samples = encode_records(records, model.tokenizer, model.image_token_id, model.tokens_per_image, 256,
                             BadRecordCounter(), "stop")
    batch = make_batch(model, samples, None, model.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = model.bridge.proj.weight.detach().clone()
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(model.bridge.proj.weight, before)

    # Stage bookkeeping with a weightless tower: align freezes it, a checkpoint of every part round-trips.
    apply_stage(model, "align", verbose=False)
    model.eval()
    path = save_checkpoint(tmp_path / "checkpoint-8", model, ("vision", "bridge"), {"train": {}}, {"step": 8})
    bridge_state = {k: v.clone() for k, v in model.bridge.state_dict().items()}
    torch.nn.init.zeros_(model.bridge.row_break)
    assert load_trained_parts(model, path) == ["vision", "bridge"]
    assert all(torch.equal(v, bridge_state[k]) for k, v in model.bridge.state_dict().items())

    # The cached-feature path (bf16 autocast in FeatureCache) and generation.
    cache = FeatureCache()
    cache.fill(model, images)
    with torch.no_grad():
        direct = model.vision_features(batch["pixel_values"])
    torch.testing.assert_close(cache.stack(images).float(), direct, rtol=0.01, atol=0.01)
    ids = [prompt_ids(model, "What colour is the square?")] * 2
    prompt = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
    out = model.generate(prompt["input_ids"], prompt["attention_mask"], vision_features=cache.stack(images),
                         max_new_tokens=12)
    assert len(out) == 2 and all(0 < len(row) <= 12 for row in out)
    # Same prompt, different image: the answers it was trained on can only come from the patches.
    assert [model.tokenizer.decode(row) for row in out] == ["The square is red.", "The circle is blue."]


def test_native_sizes_keep_only_the_patches_that_cover_each_image():
    """Fuyu's own counting: a small or narrow image costs fewer tokens than the canvas, a large one is fitted
    first; the counts equal highres.fuyu_token_count, and the kept tokens are the covering patches."""
    from lmmkit.models.highres import fuyu_token_count

    tower = PatchEmbedTower(canvas=(32, 48), patch_size=8)
    bridge = FuyuBridge(tower.hidden_size, 16, *tower.grid, patch_grid=tower.patch_grid)
    sizes = [(32, 48), (10, 20), (8, 9), (64, 48), (100, 30)]  # (height, width)
    for size in sizes:
        assert bridge.token_count(size) == fuyu_token_count(size, 8, (32, 48))
    images = [Image.new("RGB", (w, h), (255, 0, 0)) for h, w in sizes]
    with torch.no_grad():
        out = bridge(tower(tower.preprocess(images)), sizes)
    assert [t.shape[0] for t in out] == [bridge.token_count(s) for s in sizes]
    full = bridge(tower(tower.preprocess(images[:1])), sizes[:1])[0]
    fixed = FuyuBridge(tower.hidden_size, 16, *tower.grid)
    fixed.load_state_dict(bridge.state_dict())
    assert torch.equal(full, fixed(tower(tower.preprocess(images[:1])))[0])  # a canvas-sized image: same tokens
    rows, cols = tower.patch_grid((10, 20))  # 2 x 3 patches: each row ends with the row break
    small = out[1].reshape(rows, cols + 1, -1)
    assert torch.equal(small[:, cols], bridge.row_break.expand(rows, -1))
    with pytest.raises(ValueError, match="pass image_sizes"):
        bridge(tower(tower.preprocess(images[:2])))


def test_native_size_fuyu_model_splices_per_image_counts(one_torch_thread):
    from lmmkit.models.build import build_vlm

    model = build_vlm(vision="patch", bridge="fuyu", patch_size=8, patch_native_size=True)
    assert model.tokens_per_image is None and model.variable_tokens
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (24, 16))]
    assert model.image_token_counts(images) == [8 * 9, 2 * (3 + 1)]  # 24x16 (WxH): 2 rows of 3 patches
    from lmmkit.eval.generation import answer_questions

    answers = answer_questions(model, [(im, "What is in the image?") for im in images], max_new_tokens=3,
                               progress=False)
    assert len(answers) == 2

"""AnyRes geometry, feature packing and visual-token counts, checked against the transformers references.

References (transformers 5.x): `image_processing_utils.select_best_resolution`, LlavaNextProcessor's
token count and inserted <image> tokens, LlavaNextImageProcessorPil's pixel_values, LlavaNextModel and
LlavaOnevisionModel `pack_image_features`, LlavaOnevisionProcessor's count, FuyuProcessor's count.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    FuyuImageProcessorPil,
    FuyuProcessor,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextModel,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import tiny_hf
from lmmkit import IMAGE_TOKEN
from lmmkit.models.highres import (
    LLAVA_V16_PINPOINTS,
    AnyResTokens,
    anyres_grid_shape,
    anyres_max_size,
    anyres_tiles,
    anyres_token_breakdown,
    anyres_token_count,
    fixed_token_count,
    fuyu_token_count,
    gpt4v_token_count,
    pack_anyres_features,
    parse_anyres_max,
    select_best_resolution,
    unpadded_grid_size,
    validate_pinpoints,
)

V16 = [list(p) for p in LLAVA_V16_PINPOINTS]
CLIP336, PATCH14 = 336, 14
TINY, TINY_PATCH = 32, 8  # tiny CLIP: 4x4 patches per tile
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96], [96, 96], [64, 128]]
# LLaVA-OneVision's SigLIP-384/14 grid: every (i*384, j*384) for i, j in 1..6
OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _sizes(n: int, seed: int, low: int = 1, high: int = 3000) -> list[tuple[int, int]]:
    """(height, width) pairs mixing extreme aspect ratios and near-square ones."""
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(n)]


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------ best resolution


@pytest.mark.parametrize("pinpoints", [V16, [[64, 192], [128, 64], [192, 192], [64, 64], [320, 128]]])
def test_best_resolution_matches_transformers_on_random_sizes(pinpoints):
    sizes = _sizes(250, seed=1) + _sizes(50, seed=2, high=80)  # small images: upscaling, many ties
    for size in sizes:
        expected = tuple(hf_select_best_resolution(size, pinpoints))
        assert select_best_resolution(size, pinpoints) == expected, size


@pytest.mark.parametrize(("size", "pinpoints", "expected"), [
    # exact tie (same effective 32*32, same waste 1024): the earlier pinpoint wins, in either order
    ((32, 32), [[64, 32], [32, 64]], (64, 32)),
    ((32, 32), [[32, 64], [64, 32]], (32, 64)),
    # same effective (the whole 100x100 image fits both): the smaller canvas wastes less and wins though later
    ((100, 100), [[200, 400], [200, 200]], (200, 200)),
    # more effective pixels beat zero waste: 600x600 keeps 300*300, 100x100 only 100*100
    ((300, 300), [[100, 100], [600, 600]], (600, 600)),
    # v1.6 with a square image: 672x672 keeps the most; 336x1008 and 1008x336 tie below it
    ((500, 500), V16, (672, 672)),
    # very wide 100x2000: 336x1008 keeps int(2000*0.504)*int(100*0.504) = 1008*50 pixels, the most
    ((100, 2000), V16, (336, 1008)),
])
def test_best_resolution_ties(size, pinpoints, expected):
    assert select_best_resolution(size, pinpoints) == expected
    assert tuple(hf_select_best_resolution(size, pinpoints)) == expected


# ------------------------------------------------------------------------ token counts vs LlavaNextProcessor


@pytest.fixture(scope="module")
def clip336_processor(tiny_tokenizer):
    """LlavaNextProcessor as shipped for llava-v1.6 with CLIP-336/14 (CLS counted then dropped: 'default')."""
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": CLIP336},
                                                 crop_size={"height": CLIP336, "width": CLIP336},
                                                 image_grid_pinpoints=V16)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer, patch_size=PATCH14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _inserted_image_tokens(processor, image: Image.Image) -> int:
    ids = processor(images=image, text=f"{IMAGE_TOKEN}\nWhat is it?", return_tensors="pt")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


def test_design_fact_640x480_is_2340_tokens(clip336_processor):
    breakdown = anyres_token_breakdown((480, 640), V16, CLIP336, PATCH14)
    # 672x672 grid (2x2 tiles of 24x24 patches = 48x48); the 4:3 image keeps 36 rows; +1 newline per row
    assert breakdown == AnyResTokens(base=576, tiles=1728, newlines=36)
    assert breakdown.total == anyres_token_count((480, 640), V16, CLIP336, PATCH14) == 2340
    assert _inserted_image_tokens(clip336_processor, _noise(480, 640)) == 2340


def test_token_count_matches_llava_next_processor_on_random_sizes(clip336_processor):
    sizes = _sizes(150, seed=3) + [(55, 176), (49, 147)]  # last two: float noise 14.999.. / 15.999.. rows
    expected = clip336_processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [anyres_token_count(s, V16, CLIP336, PATCH14) for s in sizes] == expected


def test_unpad_rounding_follows_transformers():
    # 24x48 grid, 55x176 image: 55 * 48/176 = 14.999999999999998; rounded to 7 decimals it is 15 rows,
    # padding (24 - 15) // 2 = 4 each side leaves 16 rows (truncating to 14 would leave 14)
    assert unpadded_grid_size((24, 48), (55, 176)) == (16, 48)
    assert anyres_token_count((55, 176), V16, CLIP336, PATCH14) == 576 + 16 * 48 + 16


@pytest.mark.parametrize("size", [(480, 640), (55, 176), (900, 300), (337, 1009), (1000, 1000), (20, 700)])
def test_token_count_equals_inserted_image_tokens(clip336_processor, size):
    assert _inserted_image_tokens(clip336_processor, _noise(*size)) == anyres_token_count(size, V16, CLIP336,
                                                                                          PATCH14)


# ---------------------------------------------------------------- tiling vs LlavaNextImageProcessorPil


@pytest.mark.parametrize(("encoder", "pinpoints", "sizes"), [
    (CLIP336, V16, [(480, 640), (1000, 250), (300, 1100), (700, 700)]),
    (TINY, TINY_PINPOINTS, _sizes(20, seed=4, high=200)),
])
def test_tiles_equal_llava_next_pixel_values(encoder, pinpoints, sizes):
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": encoder},
                                           crop_size={"height": encoder, "width": encoder},
                                           image_grid_pinpoints=pinpoints,
                                           do_rescale=False, do_normalize=False)  # raw 0..255 pixels
    for k, (height, width) in enumerate(sizes):
        image = _noise(height, width, seed=k)
        views, grid = anyres_tiles(image, pinpoints, encoder)
        pixel_values = processor(image, return_tensors="pt")["pixel_values"][0]
        assert pixel_values.shape[0] == len(views) == 1 + grid[0] * grid[1], (height, width)
        assert views[0].size == (encoder, encoder)
        assert grid == tuple(get_anyres_image_grid_shape((height, width), pinpoints, encoder))
        mine = torch.stack([torch.from_numpy(np.array(v)).permute(2, 0, 1) for v in views])
        mine = mine.to(pixel_values.dtype)
        assert torch.equal(mine, pixel_values), (height, width)  # same resize, centring, zero padding, order


def test_tiles_convert_to_rgb_and_pad_centred():
    views, grid = anyres_tiles(Image.new("L", (64, 16), 255), [[32, 64], [64, 32]], 32, fill=(0, 0, 0))
    assert grid == (1, 2) and all(v.mode == "RGB" for v in views)
    # the 64x16 image fits 32x64 at 16 rows: 8 black rows above, 8 below, white in between
    column = np.array(views[1])[:, 5, 0]
    assert column[:8].max() == 0 and column[8:24].min() == 255 and column[24:].max() == 0


# ---------------------------------------------------------------- packing vs LlavaNextModel / OneVision


def _tiny_configs() -> tuple[CLIPVisionConfig, LlamaConfig]:
    vision = CLIPVisionConfig(image_size=TINY, patch_size=TINY_PATCH, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    return vision, text


@pytest.fixture(scope="module")
def llava_next_model():
    torch.manual_seed(0)
    vision, text = _tiny_configs()
    return LlavaNextModel(LlavaNextConfig(vision_config=vision, text_config=text,
                                          image_grid_pinpoints=TINY_PINPOINTS)).eval()


@pytest.fixture(scope="module")
def onevision_model():
    torch.manual_seed(0)
    vision, text = _tiny_configs()
    pinpoints = [[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)]
    return LlavaOnevisionModel(LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                                    image_grid_pinpoints=pinpoints)).eval()


def _random_features(n_tiles: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    side = TINY // TINY_PATCH
    return torch.randn(side * side, dim, generator=gen), torch.randn(n_tiles, side * side, dim, generator=gen)


def test_packing_equals_llava_next_model(llava_next_model):
    model, gen = llava_next_model, torch.Generator().manual_seed(5)
    newline = model.image_newline.detach()
    for size in _sizes(60, seed=6, high=400) + [(1, 300), (300, 1), (64, 64)]:
        rows, cols = anyres_grid_shape(size, TINY_PINPOINTS, TINY)
        base, tiles = _random_features(rows * cols, newline.shape[0], gen)
        with torch.no_grad():
            stacked = [torch.cat([base[None], tiles])]  # HF's layout: base view first
            (ref,), lengths = model.pack_image_features(stacked, torch.tensor([size]),
                                                        "default", image_newline=newline)
        mine = pack_anyres_features(base, tiles, size, TINY_PINPOINTS, TINY, TINY_PATCH, newline)
        assert torch.equal(mine, ref), size
        assert anyres_token_count(size, TINY_PINPOINTS, TINY, TINY_PATCH) == mine.shape[0] == int(lengths[0])


@pytest.mark.parametrize("anyres_max", [1, 2, 4])
def test_anyres_max_packing_equals_llava_onevision_model(onevision_model, anyres_max):
    model, gen = onevision_model, torch.Generator().manual_seed(anyres_max)
    pinpoints, newline = model.config.image_grid_pinpoints, model.image_newline.detach()
    downsampled = 0
    for size in _sizes(40, seed=7, high=500):
        rows, cols = anyres_grid_shape(size, pinpoints, TINY)
        base, tiles = _random_features(rows * cols, newline.shape[0], gen)
        with torch.no_grad():
            stacked = [torch.cat([base[None], tiles])]  # HF's layout: base view first
            (ref,), lengths = model.pack_image_features(stacked, torch.tensor([size]),
                                                        image_newline=newline,
                                                        vision_aspect_ratio=f"anyres_max_{anyres_max}")
        mine = pack_anyres_features(base, tiles, size, pinpoints, TINY, TINY_PATCH, newline,
                                    anyres_max=f"anyres_max_{anyres_max}")
        assert torch.equal(mine, ref), size  # same bilinear kernel on the same map: bit-identical
        count = anyres_token_count(size, pinpoints, TINY, TINY_PATCH, anyres_max=anyres_max)
        assert count == mine.shape[0] == int(lengths[0]), size
        downsampled += count < anyres_token_count(size, pinpoints, TINY, TINY_PATCH)
    assert downsampled >= 5  # the cap really bit, so the bilinear path was compared


def test_anyres_max_count_matches_llava_onevision_processor():
    """SigLIP-384/14 (27x27 = 729 per view, no CLS) on OneVision's 6x6 grid with anyres_max_9."""
    # Its __init__ insists on a video processor, which needs torchvision (not installed here), so set only
    # the attributes its image-token count reads, to the values a llava-onevision-*-ov folder has.
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                                image_grid_pinpoints=OV_PINPOINTS)
    processor.num_image_tokens, processor.vision_aspect_ratio = 729, "anyres_max_9"
    sizes = _sizes(120, seed=8, high=4000)
    expected = [processor._get_number_of_features(h, w, 384, 384) for h, w in sizes]
    assert [anyres_token_count(s, OV_PINPOINTS, 384, 14, anyres_max=9) for s in sizes] == expected
    uncapped = [anyres_token_count(s, OV_PINPOINTS, 384, 14) for s in sizes]
    # the cap bit on many of these sizes
    assert sum(c < u for c, u in zip(expected, uncapped, strict=True)) >= 20


def test_anyres_max_size_rule():
    # 4x4-patch tiles, cap 1 tile (16 positions): a 4x5 grid (ratio 1.118 > 1.1) shrinks to 3x4,
    # a 4x4 one (ratio 1.0) and a 4x4.4-ish one under the 1.1 slack are kept
    assert anyres_max_size((4, 5), 4, 1) == (3, 4)
    assert anyres_max_size((4, 4), 4, 1) == (4, 4)
    assert anyres_max_size((12, 8), 4, 9) == (12, 8)
    assert anyres_max_size((48, 48), 4, None) == (48, 48)
    assert parse_anyres_max("anyres_max_9") == parse_anyres_max(9) == 9


def test_pack_rejects_tiles_for_the_wrong_grid():
    newline = torch.zeros(16)
    with pytest.raises(ValueError, match=r"needs \(2, 16, 16\)"):  # 32x64 image -> 1x2 grid
        pack_anyres_features(torch.zeros(16, 16), torch.zeros(3, 16, 16), (32, 64), TINY_PINPOINTS, TINY,
                             TINY_PATCH, newline)


# ------------------------------------------------------------------------ GPT-4V, fixed, Fuyu


@pytest.mark.parametrize(("size", "detail", "tokens"), [
    ((1024, 1024), "high", 765),  # -> 768x768, 2x2 tiles: 4*170 + 85
    ((4096, 2048), "high", 1105),  # -> 2048x1024 -> 1536x768, 3x2 tiles: 6*170 + 85
    ((4096, 2048), "low", 85),
    ((7, 9000), "low", 85),
    ((600, 800), "high", 765),  # fits, shortest 600 < 768 kept: ceil(600/512) * ceil(800/512) = 2*2
    ((512, 512), "high", 255),  # exactly one tile: 170 + 85
    ((1080, 1920), "high", 1105),  # shortest 1080 -> 768, 1920*768//1080 = 1365 wide: 2*3 tiles
    ((5000, 100), "high", 765),  # -> 2048 x 40 (100*2048//5000), shortest < 768 kept: 4*1 tiles
])
def test_gpt4v_token_cost(size, detail, tokens):
    assert gpt4v_token_count(size, detail) == tokens


def test_fixed_token_count():
    assert fixed_token_count() == fixed_token_count(336, 14) == 576  # LLaVA-1.5, CLIP-336/14: 24x24
    assert fixed_token_count(224, 14) == 256
    assert fixed_token_count(384, 14) == 729  # SigLIP-so400m 384/14: the 6-pixel remainder is dropped


def test_fuyu_count_matches_fuyu_processor():
    tokenizer = tiny_hf.plain_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["|SPEAKER|", "|NEWLINE|"]})
    processor = FuyuProcessor(image_processor=FuyuImageProcessorPil(), tokenizer=tokenizer)
    sizes = _sizes(25, seed=9, high=4000) + [(1080, 1920), (100, 100), (2160, 3840)]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [fuyu_token_count(s) for s in sizes] == expected
    # by hand: 1080x1920 is the canvas, 36 rows x (64 patches + 1 row break); 4K halves onto it
    assert fuyu_token_count((1080, 1920)) == fuyu_token_count((2160, 3840)) == 36 * 65
    assert fuyu_token_count((100, 100)) == 4 * 5
    assert fuyu_token_count((100, 100), patch_size=50, canvas=(60, 60)) == 2 * 3  # 60x60 after the fit


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("call", "message"), [
    (lambda: validate_pinpoints([[336, 672], [336, 700]], 336), r"grid_pinpoints\[1\] width 700 .* multiple"),
    (lambda: validate_pinpoints([], 336), "grid_pinpoints is empty"),
    (lambda: validate_pinpoints([[336, 0]], 336), r"grid_pinpoints\[0\] width must be a positive integer"),
    (lambda: validate_pinpoints([[336]], 336), r"grid_pinpoints\[0\] must be a \(height, width\) pair"),
    (lambda: anyres_token_count((0, 640), V16, 336, 14), "image_size height must be a positive integer"),
    (lambda: anyres_token_count((480, 640), V16, 336, -14), "patch_size must be a positive integer"),
    (lambda: anyres_token_count((480, 640), V16, 14, 336), "patch_size 336 is larger than encoder_size 14"),
    (lambda: anyres_token_count((480, 640), V16, 0, 14), "encoder_size must be a positive integer"),
    (lambda: select_best_resolution((480, 640), []), "grid_pinpoints is empty"),
    (lambda: gpt4v_token_count((10, 10), "auto"), "detail must be 'low' or 'high'"),
    (lambda: gpt4v_token_count((10.5, 10), "high"), "image_size height must be a positive integer"),
    (lambda: fuyu_token_count((10, 10), canvas=(0, 10)), "canvas height"),
    (lambda: parse_anyres_max("anyres_9"), "anyres_max 'anyres_9' is not understood"),
])
def test_invalid_inputs_raise_value_error_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()

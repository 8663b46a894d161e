"""FusedVisionTower (Prismatic): several towers on one image, features concatenated patch by patch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import tiny_hf
from lmmkit.data.check import BadRecordCounter
from lmmkit.data.collate import pad_batch
from lmmkit.data.dataset import encode_records
from lmmkit.data.schema import ConversationRecord, Message
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.bridges import MLPBridge
from lmmkit.models.fused_tower import MANIFEST, FusedVisionTower
from lmmkit.models.language import load_language_model
from lmmkit.models.vision import VisionTower
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import make_batch

PATCHES = tiny_hf.PATCHES  # 16: 32 px images, 8 px patches


def save_tiny_dinov2(folder: Path, size: int = 32, seed: int = 3) -> Path:
    """A Dinov2Model (patch 8, hidden 24: a width unlike the others) + a BiT processor at `size` px."""
    torch.manual_seed(seed)
    config = Dinov2Config(image_size=size, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=2)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def clip_siglip(tiny_clip_dir, tiny_siglip_dir) -> FusedVisionTower:
    return FusedVisionTower.from_pretrained([tiny_clip_dir, tiny_siglip_dir], select_layers=[-2, -1]).eval()


def test_preprocess_stacks_each_towers_own_pixels_on_the_channel_axis(clip_siglip, images):
    clip, siglip = clip_siglip.towers
    pixels = clip_siglip.preprocess(images)
    assert pixels.shape == (3, 6, 32, 32)
    assert torch.equal(pixels[:, :3], clip.preprocess(images))
    assert torch.equal(pixels[:, 3:], siglip.preprocess(images))
    # Each tower keeps its own normalisation (CLIP's mean/std differ from SigLIP's 0.5/0.5).
    assert not torch.allclose(pixels[:, :3], pixels[:, 3:], atol=1e-2)


@pytest.mark.parametrize("pair", ["clip+siglip", "dinov2+siglip"])
def test_features_are_the_towers_features_concatenated_per_patch(pair, tiny_clip_dir, tiny_siglip_dir, dinov2_dir,
                                                                 images):
    first = {"clip+siglip": (tiny_clip_dir, -2, 32), "dinov2+siglip": (dinov2_dir, -2, 24)}[pair]
    fused = FusedVisionTower.from_pretrained([first[0], tiny_siglip_dir], select_layers=[first[1], -1]).eval()
    alone = [VisionTower.from_pretrained(first[0], select_layer=first[1]).eval(),
             VisionTower.from_pretrained(tiny_siglip_dir, select_layer=-1).eval()]
    assert fused.hidden_size == first[2] + 32
    assert fused.num_tokens() == PATCHES
    assert fused.dtype == torch.float32
    with torch.no_grad():
        feats = fused(fused.preprocess(images))
        expected = torch.cat([t(t.preprocess(images)) for t in alone], dim=-1)
    assert feats.shape == (3, PATCHES, first[2] + 32)
    assert torch.equal(feats, expected)
    assert fused.num_tokens(fused.preprocess(images[:1])) == PATCHES


def test_different_input_sizes_are_refused_naming_both_towers(tiny_siglip_dir, tmp_path):
    dino48 = save_tiny_dinov2(tmp_path / "dino48", size=48)
    with pytest.raises(ValueError) as info:
        FusedVisionTower.from_pretrained([dino48, tiny_siglip_dir])
    message = str(info.value)
    assert "tower 0 (dinov2" in message and "tower 1 (siglip_vision_model" in message
    assert "input 48x48" in message and "input 32x32" in message
    assert str(dino48) in message and str(tiny_siglip_dir) in message
    assert "same size" in message


def test_different_patch_grids_are_refused(tiny_clip_dir, tmp_path):
    # SigLIP with 4 px patches at 32 px: an 8x8 grid (64 tokens) against CLIP's 4x4 (16).
    fine = tmp_path / "siglip-p4"
    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2)
    SiglipVisionModel(config).save_pretrained(fine)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(fine)
    with pytest.raises(ValueError) as info:
        FusedVisionTower.from_pretrained([tiny_clip_dir, fine])
    message = str(info.value)
    assert "patch 8 -> 4x4 grid, 16 tokens" in message
    assert "patch 4 -> 8x8 grid, 64 tokens" in message
    assert "same patch grid" in message
    assert "drop_cls" not in message  # not a CLS problem


def test_a_kept_cls_token_is_refused_with_the_drop_cls_hint(tiny_clip_dir, tiny_siglip_dir):
    with pytest.raises(ValueError) as info:
        FusedVisionTower.from_pretrained([tiny_clip_dir, tiny_siglip_dir], drop_cls=[False, True])
    message = str(info.value)
    assert "17 tokens incl. CLS" in message and "16 tokens" in message
    assert "drop_cls=True" in message


def test_bad_arguments(tiny_clip_dir, tiny_siglip_dir, clip_siglip):
    with pytest.raises(ValueError, match="at least 2 towers"):
        FusedVisionTower([clip_siglip.towers[0]])
    with pytest.raises(ValueError, match="one per tower"):
        FusedVisionTower.from_pretrained([tiny_clip_dir, tiny_siglip_dir], select_layers=[-2])
    with pytest.raises(ValueError, match="expects 6 channels"):
        clip_siglip(torch.zeros(1, 3, 32, 32))


def test_save_and_load_round_trip(clip_siglip, tmp_path, images):
    folders = clip_siglip.save_pretrained(tmp_path / "fused")
    assert folders == [tmp_path / "fused" / "tower_0", tmp_path / "fused" / "tower_1"]
    assert (tmp_path / "fused" / MANIFEST).exists()
    from_manifest = FusedVisionTower.from_pretrained(tmp_path / "fused").eval()
    from_list = FusedVisionTower.from_pretrained(folders, select_layers=[-2, -1]).eval()
    assert [t.select_layer for t in from_manifest.towers] == [-2, -1]
    pixels = clip_siglip.preprocess(images)
    with torch.no_grad():
        expected = clip_siglip(pixels)
        assert torch.equal(from_manifest(from_manifest.preprocess(images)), expected)
        assert torch.equal(from_list(pixels), expected)


# ---- inside a VisionLanguageModel --------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_vlm(tiny_llama_dir, clip_siglip) -> VisionLanguageModel:
    llm, tokenizer = load_language_model(tiny_llama_dir)
    torch.manual_seed(0)
    model = VisionLanguageModel(clip_siglip, llm, tokenizer)
    return model.eval()


def test_vlm_forward_with_labels_trains_the_bridge_on_both_towers(fused_vlm, images):
    model = fused_vlm
    assert isinstance(model.bridge, MLPBridge)
    assert model.bridge.net[0].in_features == 64  # CLIP 32 + SigLIP 32
    assert model.tokens_per_image == PATCHES
    records = [ConversationRecord(f"s{i}", [Message("user", "<image>\nWhat is in the picture?"),
                                            Message("assistant", "A cat sitting on a red mat.")], [im])
               for i, im in enumerate(images[:2])]
    samples = encode_records(records, model.tokenizer, model.image_token_id, model.tokens_per_image, 256,
                             BadRecordCounter(), "stop")
    batch = make_batch(model, samples, None, model.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 6, 32, 32)
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # Both towers' halves of the bridge input get gradient: both feature blocks reach the loss.
    grad = model.bridge.net[0].weight.grad
    assert grad[:, :32].abs().sum() > 0 and grad[:, 32:].abs().sum() > 0
    model.zero_grad()

    # The cached path (FeatureCache, bf16) gives the same features the model computes.
    cache = FeatureCache()
    cache.fill(model, images[:2])
    cached = make_batch(model, samples, cache, model.tokenizer.pad_token_id)["vision_features"]
    with torch.no_grad():
        direct = model.vision_features(batch["pixel_values"])
    torch.testing.assert_close(cached.float(), direct, rtol=0.05, atol=0.05)


def test_vlm_generates(fused_vlm, images):
    model = fused_vlm
    ids = [prompt_ids(model, "What is in the picture?"), prompt_ids(model, "How many people are there?")]
    batch = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
    pixels = model.vision.preprocess(images[:2])
    out = model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, max_new_tokens=5)
    assert len(out) == 2 and all(len(row) <= 5 for row in out)
    assert any(out)
    # Generation sees the images: other images change the first-step logits.
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
        b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=pixels.flip(0))
    assert not torch.allclose(a.logits[:, -1], b.logits[:, -1])

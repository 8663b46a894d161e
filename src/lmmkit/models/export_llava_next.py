"""Export an lmmkit AnyRes model as a Hugging Face LlavaNext folder (`lmmkit export --format hf-llava-next`).

An lmmkit AnyRes model (`model.anyres: true`) is LlavaNext part for part: the same ViT tower on the
same views (base view + grid tiles), the same 2-layer projector, the same packing (unpad, one
`image_newline` per feature row, base features first) and the same LLM. The folder holds a
LlavaNextConfig (`image_grid_pinpoints` = lmmkit's pinpoints), the weights in the classic llava-hf
layout plus `image_newline`, and a LlavaNextProcessor whose image processor reproduces lmmkit's pixels
(tile size, resampling filter, black padding, rescale and mean/std all taken from the tower's
processor), so `AutoModelForImageTextToText` / `AutoProcessor` give lmmkit's logits.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import GenerationConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

from lmmkit import IMAGE_TOKEN
from lmmkit.models.anyres_tower import AnyResBridge, AnyResVisionTower
from lmmkit.models.export_hf import (
    LIST_TO_STRING_PREFIX,
    LLAVA_NEXT_REASON,
    ExportError,
    parts_mapping,
    parts_state_dict,
    publish,
    write_weights,
)
from lmmkit.models.vlm import VisionLanguageModel

FORMAT = "hf-llava-next"
# Image sizes (height, width) the export's processor is probed with before anything is written: several
# aspect ratios, so different pinpoints and unpadding on both axes are exercised.
PROBE_SIZES = ((48, 40), (40, 90), (100, 30), (64, 64), (33, 200))


def llava_next_mapping(model: VisionLanguageModel) -> dict:
    """The LlavaNextConfig fields that reproduce `model`, or ExportError naming what has no equivalent."""
    tower, bridge = model.vision, model.bridge
    if not isinstance(tower, AnyResVisionTower) or not isinstance(bridge, AnyResBridge):
        raise ExportError(LLAVA_NEXT_REASON)
    if tower.grid.anyres_max is not None:
        raise ExportError(f"cannot export this architecture as {FORMAT}: model.anyres_max={tower.grid.anyres_max} "
                          "downsamples the tile features (LLaVA-OneVision's anyres_max), which LlavaNext never does; "
                          "set model.anyres_max=0 for a LlavaNext export")
    mapping = parts_mapping(tower.tower, bridge.inner, model.llm, fmt=FORMAT)
    vision_size = tower.tower.model.config.image_size
    if vision_size != tower.grid.encoder_size:
        raise ExportError(f"cannot export this architecture as {FORMAT}: the tower's processor gives "
                          f"{tower.grid.encoder_size}-pixel views but its config says image_size {vision_size}; "
                          "LlavaNext tiles by the config's image_size, so the two must agree")
    return mapping


def build_next_processor(model: VisionLanguageModel, mapping: dict) -> LlavaNextProcessor:
    """LlavaNextProcessor + LlavaNextImageProcessor set to lmmkit's tiling and the tower's normalisation."""
    tower: AnyResVisionTower = model.vision  # type: ignore[assignment]
    source, size = tower.processor, tower.grid.encoder_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in tower.grid.pinpoints],
        # lmmkit resizes tiles and the base view with the tower processor's filter and pads black, as this does.
        resample=getattr(source, "resample", Image.Resampling.BICUBIC), do_pad=True, do_convert_rgb=True,
        do_resize=True, do_center_crop=True,
        do_rescale=source.do_rescale, rescale_factor=source.rescale_factor,
        do_normalize=source.do_normalize, image_mean=source.image_mean, image_std=source.image_std,
    )
    tokenizer = copy.deepcopy(model.tokenizer)
    template = LIST_TO_STRING_PREFIX + tokenizer.chat_template
    tokenizer.chat_template = template
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.grid.patch_size,
        chat_template=template, image_token=IMAGE_TOKEN,
        vision_feature_select_strategy=mapping["vision_feature_select_strategy"],
        num_additional_image_tokens=mapping["num_additional_image_tokens"],
    )
    # The processor expands each <image> by the image's size; refuse rather than write a folder whose
    # placeholder counts disagree with the features the model packs.
    rng = np.random.default_rng(0)
    for height, width in PROBE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        probe = processor(text=IMAGE_TOKEN, images=[image], add_special_tokens=False)
        n = sum(1 for t in probe["input_ids"][0] if t == model.image_token_id)
        expected = model.image_token_counts([image])[0]
        if n != expected or processor.image_token_id != model.image_token_id:
            raise ExportError(f"cannot export as {FORMAT}: LlavaNextProcessor expands {IMAGE_TOKEN} to {n} tokens "
                              f"for a {height}x{width} image but the model packs {expected} features")
    return processor


def export_llava_next(model: VisionLanguageModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write an AnyRes `model` as an HF LlavaNext folder at `out` (a temporary folder renamed into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or another --out")
    mapping = llava_next_mapping(model)
    processor = build_next_processor(model, mapping)
    tower: AnyResVisionTower = model.vision  # type: ignore[assignment]
    bridge: AnyResBridge = model.bridge  # type: ignore[assignment]
    text_config = copy.deepcopy(model.llm.config)
    text_config.tie_word_embeddings = mapping["tied"]
    vision_config = copy.deepcopy(tower.tower.model.config)
    for sub in (text_config, vision_config):
        sub._name_or_path = ""  # the local folders the parts came from mean nothing where the export goes
    config = LlavaNextConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=model.image_token_id,
        image_grid_pinpoints=[list(p) for p in tower.grid.pinpoints], image_seq_length=tower.grid.side ** 2,
        projector_hidden_act=mapping["projector_hidden_act"], vision_feature_layer=mapping["vision_feature_layer"],
        vision_feature_select_strategy=mapping["vision_feature_select_strategy"],
        multimodal_projector_bias=True, tie_word_embeddings=mapping["tied"], dtype=model.llm.dtype,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    tokenizer = processor.tokenizer
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(tmp)
    state = parts_state_dict(tower.tower.model, bridge.inner, model.llm, mapping["tied"])
    state["image_newline"] = bridge.image_newline.detach().contiguous()  # classic llava-hf name, top level
    write_weights(state, tmp)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json, for transformers 4 readers
    return publish(tmp, out)


__all__ = ["build_next_processor", "export_llava_next", "llava_next_mapping"]

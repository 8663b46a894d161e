"""Vision towers: any HF vision model folder -> a sequence of patch features (B, N, D).

ViT-style towers (CLIP, SigLIP, DINOv2) give token sequences: we take one hidden layer
(LLaVA uses the penultimate) and drop the CLS token where the model has one. Convolutional
towers (ResNet, ConvNeXt; the tiny ShapesWorld tower is a ResNet) give feature maps, which are
flattened row by row into tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel, SiglipVisionModel

from lmmkit.models.fast_pixels import fast_pixels

# model_type -> has a CLS token at position 0
VIT_TYPES = {"clip_vision_model": True, "clip": True, "siglip_vision_model": False, "siglip": False,
             "dinov2": True, "vit": True}
CONV_TYPES = {"resnet", "convnext", "convnextv2"}


class VisionEncoder(Protocol):
    """What VisionLanguageModel, FeatureCache and the training loop use of a tower.

    VisionTower (one HF model), FusedVisionTower (several, features concatenated) and PatchEmbedTower
    (raw Fuyu patches, no encoder) all provide it, so any of them can be the model's `vision` part.
    """

    @property
    def hidden_size(self) -> int: ...  # feature width D of forward's (B, N, D)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor: ...

    def num_tokens(self, pixel_values: torch.Tensor | None = None) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def save_pretrained(self, path: str | Path) -> None: ...

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class VisionTower(nn.Module):
    """An HF vision model plus its image processor, returning patch features."""

    def __init__(self, model: nn.Module, processor, select_layer: int = -1, drop_cls: bool = True) -> None:
        super().__init__()
        model_type = model.config.model_type
        if model_type not in VIT_TYPES and model_type not in CONV_TYPES:
            allowed = ", ".join(sorted([*VIT_TYPES, *CONV_TYPES]))
            raise ValueError(f"vision tower type {model_type!r} is not supported; supported: {allowed}")
        self.model = model
        self.processor = processor
        self.select_layer = select_layer
        self.is_conv = model_type in CONV_TYPES
        self.has_cls = VIT_TYPES.get(model_type, False)
        self.drop_cls = drop_cls

    @classmethod
    def from_pretrained(cls, path: str | Path, select_layer: int = -1, drop_cls: bool = True,
                        dtype: torch.dtype | None = None) -> VisionTower:
        config = AutoConfig.from_pretrained(path)
        # A full CLIP / SigLIP folder holds a text tower too; load only the vision half.
        loader = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(config.model_type, AutoModel)
        model = loader.from_pretrained(path, dtype=dtype) if dtype else loader.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path)
        return cls(model, processor, select_layer=select_layer, drop_cls=drop_cls)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return cfg.hidden_sizes[-1] if self.is_conv else cfg.hidden_size

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        # Images already at the input size (AnyRes views, ShapesWorld) skip the per-image work, same pixels.
        fast = fast_pixels(rgb, self.processor)
        return fast if fast is not None else self.processor(images=rgb, return_tensors="pt")["pixel_values"]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the processor's output: the crop when it center-crops, else its resize."""
        size = self.processor.crop_size if getattr(self.processor, "do_center_crop", False) else self.processor.size
        return (size.get("height") or size.get("shortest_edge"), size.get("width") or size.get("shortest_edge"))

    def num_tokens(self, pixel_values: torch.Tensor | None = None) -> int:
        """Visual tokens per image at the processor's input size."""
        if pixel_values is None:
            pixel_values = torch.zeros(1, 3, *self.input_size)
        with torch.no_grad():
            return self.forward(pixel_values.to(self.dtype)).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.is_conv:
            return feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C), row-major
        if self.has_cls and self.drop_cls:
            feats = feats[:, 1:]
        return feats

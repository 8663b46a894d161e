"""Cache of vision-tower features: with a frozen tower, each image is encoded once, not every epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lmmkit.data.images import load_image
from lmmkit.models.vlm import VisionLanguageModel


def image_key(image) -> str:
    """Paths are resolved, so "data/x.png" and "/abs/data/x.png" share one cache entry."""
    return str(Path(image).resolve()) if isinstance(image, (str, Path)) else f"pil:{id(image)}"


def open_image(image, where: str = "") -> Image.Image:
    return image if isinstance(image, Image.Image) else load_image(Path(image), where or str(image))


class FeatureCache:
    """Tower features (bf16, on CPU) keyed by image path. Valid only while the tower is frozen.

    One entry per image, of whatever shape the tower gives that image: (N, D) for a fixed-count
    tower, (views, N, D) for AnyRes, whose view count depends on the image size. The size is kept
    too (AnyRes packs by it), so batches never reopen the files.
    """

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.features)

    def fill(self, model: VisionLanguageModel, images: Sequence, batch_size: int = 256, desc: str = "encode images",
             autocast: bool = True) -> None:
        """Encode every image not cached yet, in batches, under no_grad."""
        # One key per image: resolving a path is a realpath walk, too slow to repeat for every question.
        by_key = {image_key(im): im for im in images}
        todo = [k for k in by_key if k not in self.features]
        model.vision.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=len(todo) <= batch_size):
                keys = todo[i:i + batch_size]
                opened = [open_image(by_key[k]) for k in keys]
                sizes = model.image_sizes(opened)
                pixels = model.vision.preprocess(opened)
                feats = model.vision_features(pixels).to(torch.bfloat16)
                for k, f, im in zip(keys, model.split_features(feats, sizes), opened, strict=True):
                    self.features[k] = f.clone()
                    self.sizes[k] = (im.height, im.width)

    def stack(self, images: Sequence) -> torch.Tensor:
        """Same-shape entries as one (n_images, ...) batch: the fixed-count fast path."""
        return torch.stack([self.features[image_key(im)] for im in images])

    def cat(self, images: Sequence) -> torch.Tensor:
        """Entries of any first-axis length joined along it: AnyRes views of several sizes in one batch."""
        return torch.cat([self.features[image_key(im)] for im in images])

    def image_sizes(self, images: Sequence) -> list[tuple[int, int]]:
        return [self.sizes[image_key(im)] for im in images]

    def inputs(self, model: VisionLanguageModel, images: Sequence) -> dict:
        """The model's image keyword arguments for these cached images: vision_features, plus image_sizes
        when the model packs by size (AnyRes)."""
        per_image = [self.features[image_key(im)] for im in images]
        out: dict = {"vision_features": model.join_features(per_image)}
        if model.variable_tokens:
            out["image_sizes"] = self.image_sizes(images)
        return out


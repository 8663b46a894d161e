"""Encoder-free vision (Fuyu): the "tower" only cuts the image into raw pixel patches.

Fuyu has no vision encoder: each p x p patch's pixels are flattened and one linear layer maps them to
a word embedding (that layer is the bridge, `lmmkit.models.bridges.fuyu.FuyuBridge`). This tower
therefore has NO parameters; it only resizes, pads, normalises and patchifies, the way Fuyu's image
processor does: downscale (never upscale) keeping the aspect ratio to fit the canvas, pad at the
bottom and right, scale pixels to [-1, 1].

Two ways to count tokens (the bridge decides, `FuyuBridge(native=...)`): on the fixed canvas every
image becomes the same (rows x cols) patch grid, padding included; with native sizes (Fuyu's own way)
each image keeps only the patches that cover it after fitting, so a small image costs fewer tokens.
The pixel tensor is canvas-sized either way, so batching and the feature cache are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CONFIG_FILE = "patch_tower.json"
SHAPES_CANVAS = (64, 64)  # ShapesWorld images are 64x64: the canvas holds them unscaled
SHAPES_PATCH = 8


class PatchEmbedTower(nn.Module):
    """Images -> (B, rows*cols, 3*p*p) raw patch vectors on a fixed (height, width) canvas; no weights.

    Patch vectors are laid out as Fuyu's: patch (r, c) is token r*cols + c (row-major), and inside a
    patch the pixel (dy, dx) channel k sits at index (dy*p + dx)*3 + k, so a Fuyu checkpoint's
    `vision_embed_tokens` weight would fit FuyuBridge's projection unchanged.
    """

    def __init__(self, canvas: tuple[int, int] = SHAPES_CANVAS, patch_size: int = SHAPES_PATCH,
                 resample: int = Image.Resampling.BILINEAR) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
        height, width = canvas
        if height % patch_size or width % patch_size or height < patch_size or width < patch_size:
            raise ValueError(f"canvas {height}x{width} is not a whole number of {patch_size}x{patch_size} patches; "
                             f"use a canvas whose sides are multiples of {patch_size}, e.g. "
                             f"{max(1, round(height / patch_size)) * patch_size}x"
                             f"{max(1, round(width / patch_size)) * patch_size}")
        self.canvas = (height, width)
        self.patch_size = patch_size
        self.resample = resample

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches on the canvas."""
        return self.canvas[0] // self.patch_size, self.canvas[1] // self.patch_size

    @property
    def hidden_size(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.canvas

    @property
    def dtype(self) -> torch.dtype:
        # No parameters to ask (VisionTower reads its weights' dtype): pixels stay float32, and the
        # bridge casts the patches to its own dtype.
        return torch.float32

    def num_tokens(self, pixel_values: torch.Tensor | None = None) -> int:
        if pixel_values is not None:
            self._check_canvas(pixel_values)
        rows, cols = self.grid
        return rows * cols

    def fitted_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of an image of `image_size` (height, width) once fitted onto the canvas."""
        height, width = self.canvas
        h, w = image_size
        if h <= height and w <= width:
            return h, w
        scale = min(height / h, width / w)
        return max(1, int(h * scale)), max(1, int(w * scale))

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of patches that cover an image of `image_size` (height, width) on the canvas."""
        h, w = self.fitted_size(image_size)
        p = self.patch_size
        return -(-h // p), -(-w // p)

    def views_per_image(self, image_sizes) -> list[int]:
        """One canvas per image (the variable-count model's feature split)."""
        return [1] * len(image_sizes)

    def fit(self, image: Image.Image) -> Image.Image:
        """The image downscaled to fit the canvas, aspect ratio kept (Fuyu's truncating rule); never upscaled."""
        h, w = self.fitted_size((image.height, image.width))
        if (h, w) == (image.height, image.width):
            return image
        return image.resize((w, h), self.resample)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1]; each image at the top-left of a black canvas (padding = -1)."""
        height, width = self.canvas
        out = torch.full((len(images), 3, height, width), -1.0)
        for i, image in enumerate(images):
            pixels = np.asarray(self.fit(image.convert("RGB")), dtype=np.float32)  # (h, w, 3)
            h, w = pixels.shape[:2]
            out[i, :, :h, :w] = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0
        return out

    def _check_canvas(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, *self.canvas):
            raise ValueError(f"patch tower expects pixels of shape (B, 3, {self.canvas[0]}, {self.canvas[1]}) from "
                             f"its preprocess, got {tuple(pixel_values.shape)}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_canvas(pixel_values)
        batch = pixel_values.shape[0]
        rows, cols = self.grid
        p = self.patch_size
        # (B, 3, rows, p, cols, p) -> (B, rows, cols, p, p, 3): patches row-major, then (dy, dx, channel).
        patches = pixel_values.reshape(batch, 3, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(batch, rows * cols, p * p * 3)

    # ---- saving / loading: only the geometry, since there are no weights -----------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"canvas": list(self.canvas), "patch_size": self.patch_size, "resample": int(self.resample)}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PatchEmbedTower:
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
        return cls(tuple(config["canvas"]), config["patch_size"], config.get("resample", Image.Resampling.BILINEAR))


__all__ = ["CONFIG_FILE", "SHAPES_CANVAS", "SHAPES_PATCH", "PatchEmbedTower"]

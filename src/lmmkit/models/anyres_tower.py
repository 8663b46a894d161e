"""LLaVA-NeXT AnyRes as an lmmkit model: a ViT tower on each image's base view and grid tiles, and a
bridge that packs the bridged tile features with a learned `image_newline` after every feature row.

The work is split as LlavaNext splits it. The tiling and the tower call are the vision part
(`AnyResVisionTower`): preprocessing gives one flat batch of encoder-sized views, base view first
per image, and the tower's features are cacheable while it is frozen, like any tower's. Packing
happens *after* the projector, in LLM space (`AnyResBridge`): the tile features are stitched into
one map, the padding the tiling added is cut away, `anyres_max` optionally downsamples it, and the
newline embedding ends each row. The newline is a parameter of the bridge, so `align` trains it
with the projector and checkpoints save it in `bridge.safetensors`.

Geometry, tiling and packing are `lmmkit.models.highres`, whose results are tested equal to
transformers' LlavaNextProcessor / LlavaNextImageProcessor / `pack_image_features`. Each image's
(height, width) decides its grid and its unpadding, so every call that bridges features passes
`image_sizes`, as HF LlavaNext does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lmmkit.models.highres import (
    Size,
    anyres_grid_shape,
    anyres_tiles,
    anyres_token_count,
    default_pinpoints,
    format_pinpoints,
    pack_anyres_features,
    validate_pinpoints,
)
from lmmkit.models.vision import VisionTower


@dataclass(frozen=True)
class AnyResGrid:
    """The AnyRes geometry of one model: grid pinpoints (H, W), the encoder's square input size, its
    pixel patch size, and LLaVA-OneVision's optional cap (None = LLaVA-NeXT, no downsampling)."""

    pinpoints: tuple[Size, ...]
    encoder_size: int
    patch_size: int
    anyres_max: int | None = None

    @property
    def side(self) -> int:
        """Patches per side of one view: features per view = side**2."""
        return self.encoder_size // self.patch_size

    def views(self, image_size: Size) -> int:
        """Encoder views of one image: the base view plus rows x cols tiles."""
        rows, cols = anyres_grid_shape(image_size, self.pinpoints, self.encoder_size)
        return 1 + rows * cols

    def token_count(self, image_size: Size) -> int:
        return anyres_token_count(image_size, self.pinpoints, self.encoder_size, self.patch_size, self.anyres_max)

    def pack(self, views: torch.Tensor, image_size: Size, image_newline: torch.Tensor) -> torch.Tensor:
        """(views, side**2, D) bridged features of one image, base first -> its (tokens, D) sequence."""
        return pack_anyres_features(views[0], views[1:], image_size, self.pinpoints, self.encoder_size,
                                    self.patch_size, image_newline, self.anyres_max)


class AnyResVisionTower(nn.Module):
    """A ViT VisionTower run on [base view, tile 1, ...] of every image (LLaVA-NeXT AnyRes).

    `preprocess` returns all views of all images as one (total views, 3, S, S) batch, images in order;
    `forward` returns the tower's (total views, side**2, D) features. Which views belong to which image
    follows from the image sizes (`views_per_image`).
    """

    def __init__(self, tower: VisionTower, grid_pinpoints: Sequence[Sequence[int]] | None = None,
                 anyres_max: int | None = None) -> None:
        super().__init__()
        if not isinstance(tower, VisionTower) or tower.is_conv:
            kind = f"a convolutional {tower.model.config.model_type!r} tower" if isinstance(tower, VisionTower) \
                else f"a {type(tower).__name__}"
            raise ValueError(f"model.anyres tiles images for a ViT tower (CLIP, SigLIP), but the vision side is {kind}: "
                             "its features are not one token per patch of a square grid; set model.anyres=false or "
                             "model.vision to a CLIP / SigLIP folder")
        height, width = tower.input_size
        if height != width:
            raise ValueError(f"model.anyres needs a square tower input (the tiles are square), but the tower's "
                             f"processor gives {height}x{width}")
        patch = int(tower.model.config.patch_size)
        side = height // patch
        n_tokens = tower.num_tokens()
        if n_tokens != side * side:
            raise ValueError(f"model.anyres: the tower gives {n_tokens} tokens per view but its patch grid is "
                             f"{side}x{side} = {side * side}; the tiles are stitched on that grid, so the CLS token "
                             "must go: set model.vision_drop_cls=true")
        points = default_pinpoints(height) if grid_pinpoints is None else grid_pinpoints
        _check_multiples(points, height)
        checked = validate_pinpoints(points, height)
        self.tower = tower
        self.grid = AnyResGrid(tuple(checked), height, patch, anyres_max or None)

    # ---- what VisionLanguageModel and the training loop use of a tower ---------------------------
    @property
    def hidden_size(self) -> int:
        return self.tower.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    @property
    def processor(self) -> Any:
        """The tower's own image processor: it normalises each view (resample, mean and std come from it)."""
        return self.tower.processor

    def num_tokens(self, pixel_values: torch.Tensor | None = None) -> int:
        """Features per view (side**2); an image's count depends on its size: `AnyResGrid.token_count`."""
        return self.tower.num_tokens(pixel_values)

    def save_pretrained(self, path: str | Path) -> None:
        self.tower.save_pretrained(path)

    def views_per_image(self, image_sizes: Sequence[Size]) -> list[int]:
        return [self.grid.views(tuple(size)) for size in image_sizes]

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """All views of all images, (total views, 3, S, S): per image the base view, then its tiles row-major.

        Tiles are resized with the tower processor's resampling filter and padded black, as
        LlavaNextImageProcessor does; then the tower's processor normalises every view (one call).
        """
        resample = getattr(self.tower.processor, "resample", Image.Resampling.BICUBIC)
        views: list[Image.Image] = []
        for image in images:
            tiles, _ = anyres_tiles(image, self.grid.pinpoints, self.grid.encoder_size, resample=int(resample))
            views += tiles
        return self.tower.preprocess(views)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)


class AnyResBridge(nn.Module):
    """A per-token bridge (the MLP projector) followed by LlavaNext's packing with `image_newline`.

    forward(features, image_sizes) -> one (tokens_i, llm_dim) tensor per image; the projector runs once
    on every view of the batch, as in LlavaNext, then each image is packed on its own.
    """

    variable_tokens = True  # VisionLanguageModel: the visual tokens of an image depend on its size

    def __init__(self, inner: nn.Module, llm_dim: int, grid: AnyResGrid) -> None:
        super().__init__()
        self.inner = inner
        # LlavaNext's initialisation: normal with std 1/sqrt(hidden), the scale of a word embedding.
        self.image_newline = nn.Parameter(torch.randn(llm_dim) / math.sqrt(llm_dim))
        self.grid = grid

    def num_output_tokens(self, n_in: int) -> int:
        """Tokens per view before packing (the projector maps each feature on its own)."""
        return self.inner.num_output_tokens(n_in)

    def token_count(self, image_size: Size) -> int:
        return self.grid.token_count(tuple(image_size))

    def forward(self, features: torch.Tensor, image_sizes: Sequence[Size]) -> list[torch.Tensor]:
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        views = [self.grid.views(size) for size in sizes]
        if sum(views) != features.shape[0]:
            raise ValueError(f"AnyRes features hold {features.shape[0]} views but the image sizes {sizes} need "
                             f"{sum(views)} ({'+'.join(map(str, views))}): features and image_sizes must come "
                             "from the same images, in the same order")
        projected = self.inner(features)
        return [self.grid.pack(chunk, size, self.image_newline)
                for chunk, size in zip(torch.split(projected, views), sizes, strict=True)]


def _check_multiples(points: Sequence[Sequence[int]], size: int) -> None:
    """Name the first pinpoint the tower's tiles do not divide (the config could not know the tower's size)."""
    for index, (height, width) in enumerate(points):
        for side, value in (("height", height), ("width", width)):
            if value % size:
                fixed = max(size, round(value / size) * size)
                raise ValueError(f"model.anyres_grid_pinpoints={format_pinpoints(points)!r}: pinpoint {index + 1} "
                                 f"({height}x{width}) has {side} {value}, not a multiple of the vision tower's input "
                                 f"size {size} (the grid is cut into {size}x{size} tiles); use e.g. {fixed}")


def make_anyres(tower: VisionTower, bridge: nn.Module, llm_dim: int, grid_pinpoints: Sequence[Sequence[int]] | None,
                anyres_max: int | None) -> tuple[AnyResVisionTower, AnyResBridge]:
    """Wrap a tower and a freshly built per-token bridge into the AnyRes pair (build_vlm's model.anyres)."""
    anyres_tower = AnyResVisionTower(tower, grid_pinpoints, anyres_max)
    return anyres_tower, AnyResBridge(bridge, llm_dim, anyres_tower.grid)


__all__ = ["AnyResBridge", "AnyResGrid", "AnyResVisionTower", "make_anyres"]

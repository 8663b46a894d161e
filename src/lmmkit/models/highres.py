"""High-resolution image handling and visual-token accounting for LLaVA-family models.

Why this exists: a VLM's context cost per image depends on the image size in ways that are easy to get
subtly wrong (AnyRes grid choice, unpadding rounding, newline tokens, OneVision's downsampling). These
pure functions reproduce the arithmetic of the reference implementations exactly, so a token budget
computed here is the one the model will actually see, without running an encoder.

Conventions (the ones transformers uses for LlavaNext, so HF configs can be passed through unchanged):
every size is ``(height, width)``: ``image_size``, each grid pinpoint, and feature-map grids. The
original LLaVA code orders both the image size and the pinpoints as (width, height); the selection
rule is symmetric under swapping both, so results agree whenever the pinpoint list is read in the
same order as the image size.

Torch is imported lazily (only the feature-packing functions need it), so token counting stays cheap
for the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image

if TYPE_CHECKING:
    import torch

Size = tuple[int, int]  # (height, width)

LLAVA_V16_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""LLaVA-1.6 (LLaVA-NeXT) grid pinpoints, (height, width)."""
CLIP336_ENCODER_SIZE = 336
CLIP336_PATCH_SIZE = 14
FUYU_PATCH_SIZE = 30
FUYU_CANVAS: Size = (1080, 1920)
"""Fuyu's maximum canvas, (height, width): larger images are downscaled to fit it."""
GPT4V_LOW_TOKENS = 85
GPT4V_TILE_TOKENS = 170
GPT4V_TILE = 512


# ---------------------------------------------------------------- validation


def _positive_int(value: object, name: str, hint: str = "") -> int:
    """Reject bools, floats and non-positive values: a silent float would change the rounding below."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")
    return value


def _size(value: object, name: str) -> Size:
    """Check a (height, width) pair of positive integers."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a (height, width) pair of positive integers, got {value!r}")
    return (_positive_int(value[0], f"{name} height"), _positive_int(value[1], f"{name} width"))


def validate_pinpoints(grid_pinpoints: Sequence[Sequence[int]], encoder_size: int) -> list[Size]:
    """Return the pinpoints as (height, width) tuples, or raise ValueError naming the bad one.

    Each pinpoint must be a whole number of encoder tiles: the grid is cut into encoder-sized tiles, and
    a remainder would be silently dropped by the tiling but still counted by the token formulas.
    """
    _positive_int(encoder_size, "encoder_size")
    if not isinstance(grid_pinpoints, Sequence) or isinstance(grid_pinpoints, str):
        raise ValueError(f"grid_pinpoints must be a list of (height, width) pairs, got {grid_pinpoints!r}")
    if not grid_pinpoints:
        raise ValueError("grid_pinpoints is empty: give at least one (height, width) resolution, "
                         f"e.g. [[{encoder_size}, {encoder_size}]]")
    out = []
    for index, point in enumerate(grid_pinpoints):
        height, width = _size(point, f"grid_pinpoints[{index}]")
        for side, value in (("height", height), ("width", width)):
            if value % encoder_size:
                fixed = max(encoder_size, round(value / encoder_size) * encoder_size)
                raise ValueError(
                    f"grid_pinpoints[{index}] {side} {value} is not a multiple of encoder_size "
                    f"{encoder_size}: "
                    f"use a multiple such as {fixed}, or change encoder_size")
        out.append((height, width))
    return out


def parse_pinpoints(text: str) -> list[Size]:
    """"336x672,672x336" (each HxW, comma-separated; spaces allowed) -> [(336, 672), (672, 336)].

    The config's string form: one line in YAML and on the command line. Raises ValueError naming the
    entry that is not HxW with positive integers. Multiples of the encoder size are checked later
    (`validate_pinpoints`), when the tower, and so its size, is known.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"grid pinpoints must be a string like '336x672,672x336' (HxW), got {text!r}")
    out: list[Size] = []
    for index, item in enumerate(text.split(",")):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"pinpoint {index + 1} {item.strip()!r} is not HEIGHTxWIDTH with positive "
                             "integers (e.g. 336x672)")
        out.append((int(parts[0]), int(parts[1])))
    return out


def format_pinpoints(points: Sequence[Sequence[int]]) -> str:
    """The inverse of `parse_pinpoints`."""
    return ",".join(f"{h}x{w}" for h, w in points)


def default_pinpoints(encoder_size: int) -> list[Size]:
    """LLaVA-1.6's grid in units of the encoder size: 1x2, 2x1, 2x2, 3x1, 1x3 tiles (336 -> the v1.6 list)."""
    return [(encoder_size * rows, encoder_size * cols) for rows, cols in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def _patches_per_side(encoder_size: int, patch_size: int) -> int:
    """Patch-grid side of one encoder view: floor, like a strided patch embedding (SigLIP 384/14 -> 27)."""
    _positive_int(encoder_size, "encoder_size")
    _positive_int(patch_size, "patch_size")
    if patch_size > encoder_size:
        raise ValueError(f"patch_size {patch_size} is larger than encoder_size {encoder_size}: "
                         "the encoder would see no patch; check the two are not swapped")
    return encoder_size // patch_size


def parse_anyres_max(value: int | str | None) -> int | None:
    """Accept 9 or LLaVA-OneVision's ``vision_aspect_ratio`` string "anyres_max_9"; None means no cap."""
    if value is None:
        return None
    if isinstance(value, str):
        digits = value.removeprefix("anyres_max_")
        if not digits.isdigit():
            raise ValueError(f"anyres_max {value!r} is not understood: "
                             "use an integer like 9 or 'anyres_max_9'")
        value = int(digits)
    return _positive_int(value, "anyres_max", " (the maximum number of tiles' worth of features, e.g. 9)")


# ---------------------------------------------------------------- AnyRes geometry


def select_best_resolution(image_size: Size, grid_pinpoints: Sequence[Sequence[int]]) -> Size:
    """Pick the pinpoint that keeps most of the image's pixels, then wastes least canvas.

    effective = min(int(W*s) * int(H*s), W*H) with s = min(w/W, h/H): the pixels the image keeps when
    resized to fit (never counting upscaled pixels as gained). Ties on effective go to the least waste
    (w*h - effective); exact ties keep the earlier pinpoint.
    """
    height, width = _size(image_size, "image_size")
    if not grid_pinpoints:
        raise ValueError("grid_pinpoints is empty: give at least one (height, width) resolution")
    best: Size | None = None
    best_effective, best_waste = -1, math.inf
    for index, point in enumerate(grid_pinpoints):
        cand_h, cand_w = _size(point, f"grid_pinpoints[{index}]")
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_h, cand_w), effective, waste
    assert best is not None
    return best


def anyres_grid_shape(image_size: Size, grid_pinpoints: Sequence[Sequence[int]], encoder_size: int) -> Size:
    """(rows, cols) of encoder tiles covering the best pinpoint for this image."""
    points = validate_pinpoints(grid_pinpoints, encoder_size)
    best_h, best_w = select_best_resolution(image_size, points)
    return best_h // encoder_size, best_w // encoder_size


def fit_within(image_size: Size, target: Size) -> Size:
    """Size of the image resized to fit `target` keeping its aspect ratio (LlavaNext's rule).

    The side with the smaller scale fills the target exactly; the other is rounded *up* and clamped, so
    the resized image never leaves a one-pixel sliver of padding that rounding down would create.
    """
    height, width = _size(image_size, "image_size")
    target_h, target_w = _size(target, "target")
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_tiles(image: Image.Image, grid_pinpoints: Sequence[Sequence[int]], encoder_size: int,
                 resample: int = Image.Resampling.BICUBIC,
                 fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[list[Image.Image], Size]:
    """Cut an image into [base, tile_1, ...] encoder-sized views (tiles row-major) and the grid (rows, cols).

    The base view is the whole image squashed to encoder_size x encoder_size (global context); the tiles
    come from the image resized to fit the best pinpoint and padded, centred, with `fill` (black, like
    transformers; the original LLaVA pads with the mean colour). The image is converted to RGB first.
    """
    points = validate_pinpoints(grid_pinpoints, encoder_size)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    best_h, best_w = select_best_resolution((rgb.height, rgb.width), points)
    new_h, new_w = fit_within((rgb.height, rgb.width), (best_h, best_w))
    canvas = Image.new("RGB", (best_w, best_h), fill)
    canvas.paste(rgb.resize((new_w, new_h), resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
    rows, cols = best_h // encoder_size, best_w // encoder_size
    tiles = [canvas.crop((c * encoder_size, r * encoder_size, (c + 1) * encoder_size, (r + 1) * encoder_size))
             for r in range(rows) for c in range(cols)]
    base = rgb.resize((encoder_size, encoder_size), resample)
    return [base, *tiles], (rows, cols)


def unpadded_grid_size(grid_size: Size, image_size: Size) -> Size:
    """(height, width) left of a padded feature grid once the padding rows/columns are removed.

    Matches transformers' `unpad_image`: the scaled side is rounded to 7 decimals before truncation (so
    float noise like 35.9999999 counts as 36), and the same padding, floor((cur - new) / 2), is removed
    from both ends, which keeps one extra row/column when the difference is odd.
    """
    cur_h, cur_w = _size(grid_size, "grid_size")
    height, width = _size(image_size, "image_size")
    if width / height > cur_w / cur_h:  # image is wider than the grid: padding is above and below
        new_h = int(round(height * (cur_w / width), 7))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = int(round(width * (cur_h / height), 7))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def anyres_max_size(grid_size: Size, patches_per_side: int, anyres_max: int | None) -> Size:
    """Grid size after LLaVA-OneVision's "anyres_max_N" cap (unchanged when anyres_max is None).

    ratio = sqrt(H*W / (N * p^2)) with p the patch side of one tile; only when ratio > 1.1 (the
    reference's slack, so grids just over the cap are kept) the grid shrinks to floor(H/ratio) x
    floor(W/ratio), bounding the features to about N tiles' worth.
    """
    height, width = grid_size  # may be 0 rows: unpadding an extremely wide image can remove every row
    if anyres_max is None or height * width == 0:
        return height, width
    ratio = math.sqrt(height * width / (anyres_max * patches_per_side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


# ---------------------------------------------------------------- token counts


class AnyResTokens(NamedTuple):
    """AnyRes visual tokens split by origin: base view, unpadded tile features, image_newline tokens."""

    base: int
    tiles: int
    newlines: int

    @property
    def total(self) -> int:
        return self.base + self.tiles + self.newlines


def anyres_token_breakdown(image_size: Size, grid_pinpoints: Sequence[Sequence[int]], encoder_size: int,
                           patch_size: int, anyres_max: int | str | None = None) -> AnyResTokens:
    """AnyRes token counts without features; sums to the length `pack_anyres_features` produces."""
    side = _patches_per_side(encoder_size, patch_size)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, encoder_size)
    grid = unpadded_grid_size((rows * side, cols * side), image_size)
    height, width = anyres_max_size(grid, side, parse_anyres_max(anyres_max))
    return AnyResTokens(base=side * side, tiles=height * width, newlines=height)


def anyres_token_count(image_size: Size, grid_pinpoints: Sequence[Sequence[int]], encoder_size: int,
                       patch_size: int, anyres_max: int | str | None = None) -> int:
    """Visual tokens of one image under AnyRes: base + unpadded tiles + one newline per feature row.

    640x480 with the LLaVA-1.6 pinpoints and CLIP-336/14: 576 + 1728 + 36 = 2340.
    """
    return anyres_token_breakdown(image_size, grid_pinpoints, encoder_size, patch_size, anyres_max).total


def fixed_token_count(encoder_size: int = CLIP336_ENCODER_SIZE, patch_size: int = CLIP336_PATCH_SIZE) -> int:
    """LLaVA-1.5: one token per patch of the single encoder view, CLS dropped (336/14 -> 576)."""
    side = _patches_per_side(encoder_size, patch_size)
    return side * side


def fuyu_token_count(image_size: Size, patch_size: int = FUYU_PATCH_SIZE, canvas: Size = FUYU_CANVAS) -> int:
    """Fuyu: patches of the (downscaled-to-fit-canvas) image, plus one row-break token per patch row.

    Images larger than the canvas shrink by min(canvas_h/H, canvas_w/W), sides truncated; smaller ones
    are never upscaled. Partial patches at the edges count as whole ones (ceil).
    """
    height, width = _size(image_size, "image_size")
    canvas_h, canvas_w = _size(canvas, "canvas")
    _positive_int(patch_size, "patch_size")
    if height > canvas_h or width > canvas_w:
        scale = min(canvas_h / height, canvas_w / width)
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    return rows * (cols + 1)


def gpt4v_token_count(image_size: Size, detail: str = "high") -> int:
    """OpenAI's published GPT-4V/4o image cost: 85 for low detail; 170 per 512-px tile + 85 for high.

    High detail first fits the image in 2048x2048, then shrinks the shortest side to 768 (neither step
    upscales). Integer floor arithmetic keeps the pinned side exact (no 767.999 from float scaling).
    """
    height, width = _size(image_size, "image_size")
    if detail == "low":
        return GPT4V_LOW_TOKENS
    if detail != "high":
        raise ValueError(f"detail must be 'low' or 'high', got {detail!r}")
    if max(height, width) > 2048:
        long_side = max(height, width)
        height, width = max(1, height * 2048 // long_side), max(1, width * 2048 // long_side)
    if min(height, width) > 768:
        short_side = min(height, width)
        height, width = height * 768 // short_side, width * 768 // short_side
    tiles = math.ceil(height / GPT4V_TILE) * math.ceil(width / GPT4V_TILE)
    return GPT4V_TILE_TOKENS * tiles + GPT4V_LOW_TOKENS


# ---------------------------------------------------------------- feature packing (torch)


def unpad_features(feature_map: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Drop the padding rows/columns of a (D, H, W) feature map, as `unpadded_grid_size` counts them."""
    _, cur_h, cur_w = feature_map.shape
    new_h, new_w = unpadded_grid_size((cur_h, cur_w), image_size)
    top, left = (cur_h - new_h) // 2, (cur_w - new_w) // 2
    return feature_map[:, top:top + new_h, left:left + new_w]


def pack_anyres_features(base_features: torch.Tensor, tile_features: torch.Tensor, image_size: Size,
                         grid_pinpoints: Sequence[Sequence[int]], encoder_size: int, patch_size: int,
                         image_newline: torch.Tensor, anyres_max: int | str | None = None) -> torch.Tensor:
    """One image's AnyRes sequence (N, D): base features, then the unpadded tile map row by row + newlines.

    base_features: (N_base, D); tile_features: (rows*cols, p*p, D), tiles row-major, each on a p x p patch
    grid (p = encoder_size // patch_size); image_newline: (D,). The tiles are stitched into one
    (D, rows*p, cols*p) map so neighbouring patches across tile borders become neighbours, the padding
    added by `anyres_tiles` is cut away (it carries no image), the map is optionally downsampled
    (anyres_max, bilinear like LLaVA-OneVision) and a newline embedding ends every row, telling the LLM
    where rows break in a 2D layout it otherwise sees as a flat sequence.
    """
    import torch
    import torch.nn.functional as F

    side = _patches_per_side(encoder_size, patch_size)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, encoder_size)
    if base_features.dim() != 2:
        raise ValueError(f"base_features must be (N_base, D), got shape {tuple(base_features.shape)}")
    dim = base_features.shape[1]
    expected = (rows * cols, side * side, dim)
    if tuple(tile_features.shape) != expected:
        raise ValueError(f"tile_features has shape {tuple(tile_features.shape)} but image_size {image_size} "
                         f"needs {expected} (a {rows}x{cols} grid of {side}x{side}-patch tiles, D={dim})")
    if tuple(image_newline.shape) != (dim,):
        raise ValueError(f"image_newline must have shape ({dim},), got {tuple(image_newline.shape)}")
    # (rows, cols, p, p, D) -> (D, rows, p, cols, p) -> (D, rows*p, cols*p)
    grid = tile_features.reshape(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = unpad_features(grid.reshape(dim, rows * side, cols * side), image_size)
    target = anyres_max_size(tuple(grid.shape[1:]), side, parse_anyres_max(anyres_max))
    if target != tuple(grid.shape[1:]):
        grid = F.interpolate(grid[None], size=list(target), mode="bilinear")[0]
    newline = image_newline.to(grid.dtype).reshape(dim, 1, 1).expand(dim, grid.shape[1], 1)
    grid = torch.cat((grid, newline), dim=2)
    return torch.cat((base_features, grid.flatten(1).transpose(0, 1)), dim=0)

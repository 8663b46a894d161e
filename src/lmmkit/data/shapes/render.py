"""Scene graph -> RGB image, and the dense per-cell truth the vision tower is pretrained on."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lmmkit.data.shapes.world import COLOURS, GRID, IMAGE_SIZE, SHAPES, WORDS, Scene, SceneObject

TEXT_ROW_Y = 52


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _polygon(cx: float, cy: float, r: float, n: int, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    fill = COLOURS[o.colour]
    x, y, r = o.x, o.y, o.radius
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=max(2, r // 3))
    elif o.shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon(_polygon(x, y + r * 0.15, r, 3), fill=fill)
    elif o.shape == "diamond":
        draw.polygon(_polygon(x, y, r, 4), fill=fill)
    elif o.shape == "hexagon":
        draw.polygon(_polygon(x, y, r, 6, phase=0.0), fill=fill)
    elif o.shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif o.shape == "cross":
        w = max(2, int(r * 0.35))
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {o.shape!r}")


def render_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o)
    if scene.text:
        draw.text((scene.text_x, TEXT_ROW_Y), scene.text, fill=(235, 235, 235), font=_font())
    return img


def dense_labels(scene: Scene) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-cell colour and shape class (0 = no object centre in that cell), and the word id (0 = none)."""
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    colour = np.zeros((GRID, GRID), dtype=np.int64)
    shape = np.zeros((GRID, GRID), dtype=np.int64)
    for o in scene.objects:
        row, col = o.cell
        colour[row, col] = colour_ids[o.colour]
        shape[row, col] = shape_ids[o.shape]
    word = WORDS.index(scene.text) + 1 if scene.text else 0
    return colour, shape, word

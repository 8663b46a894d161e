"""Layout and rendering of the ShapesWorld attack twins: a scene with lines of text written under it.

An attack image is an ordinary ShapesWorld scene whose objects sit in the upper part of the 64x64 image
and whose lower part holds up to three lines of text (a false claim, an injected instruction, or a fake
contact card). The text band never overlaps an object, so the scene truth (which objects are drawn)
stays exact, and `render_attack` is a pure function of (scene, lines, style): a test can re-render an
item and compare pixels instead of trusting an OCR engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from lmmkit.data.shapes.render import TEXT_ROW_Y, _font, render_scene
from lmmkit.data.shapes.world import CELL, IMAGE_SIZE, Scene, SceneObject

LINE_HEIGHT = 10  # px between text lines (the default font's capitals span rows 2-10 of a line)
MAX_LINES = 3
TEXT_X = 2
MAX_TEXT_WIDTH = IMAGE_SIZE - TEXT_X - 1  # a line wider than this would be cut off at the right edge
TEXT_COLOUR = (235, 235, 235)  # the colour ShapesWorld's rendered words use
CARD_FILL = (205, 205, 200)  # contact cards: dark text on a light card, as an ID card looks
CARD_TEXT = (20, 20, 24)
STYLES: tuple[str, ...] = ("plain", "card")


class LayoutError(ValueError):
    """Text that cannot be laid out in the image (too many lines, a line too wide)."""


def line_ys(n_lines: int) -> list[int]:
    """The y at which each of `n_lines` lines is drawn: the last one on ShapesWorld's own text row."""
    return [TEXT_ROW_Y - LINE_HEIGHT * (n_lines - 1 - k) for k in range(n_lines)]


def band_top(n_lines: int) -> int:
    """The first pixel row the text band of `n_lines` lines may touch (objects stay above it)."""
    return line_ys(n_lines)[0] if n_lines else IMAGE_SIZE


def check_lines(lines: Sequence[str], where: str = "") -> None:
    """Raise LayoutError (naming `where`) unless the lines fit the image."""
    if len(lines) > MAX_LINES:
        raise LayoutError(f"{where}: {len(lines)} text lines; at most {MAX_LINES} fit under the objects")
    for line in lines:
        if not line.strip():
            raise LayoutError(f"{where}: an empty text line")
        left, _, right, _ = _font().getbbox(line)
        if right - left > MAX_TEXT_WIDTH:
            raise LayoutError(f"{where}: line {line!r} is {right - left} px wide; at most {MAX_TEXT_WIDTH} fit")


def place_above(rng: random.Random, names: Sequence[str], bottom: int, tries: int = 400) -> list[SceneObject] | None:
    """Objects named `names`, none overlapping another or reaching row `bottom`, centres in distinct
    token-grid cells (as world._place does for the whole object area). None when they do not fit."""
    placed: list[SceneObject] = []
    for name in names:
        colour, shape = name.split(" ")
        for _ in range(tries):
            r = rng.randint(5, 7)
            if bottom - r - 2 < r + 1:
                return None
            x = rng.randint(r + 1, IMAGE_SIZE - r - 2)
            y = rng.randint(r + 1, bottom - r - 2)
            obj = SceneObject(colour, shape, x, y, r)
            if all((o.x - x) ** 2 + (o.y - y) ** 2 > (o.radius + r + 2) ** 2 and o.cell != obj.cell for o in placed):
                placed.append(obj)
                break
        else:
            return None
    return placed


def relayout(rng: random.Random, scene: Scene, n_lines: int, scene_id: str) -> Scene | None:
    """The same objects (names, in order) moved above a text band of `n_lines` lines; no rendered word."""
    objects = place_above(rng, scene.names, band_top(n_lines))
    if objects is None:
        return None
    return Scene(scene_id, objects, None, 0, scene.background)


def render_attack(scene: Scene, lines: Sequence[str] = (), style: str = "plain") -> Image.Image:
    """The scene (its own rendered word too, if any) with `lines` written under the objects."""
    if style not in STYLES:
        raise LayoutError(f"{scene.id}: unknown text style {style!r}; one of {', '.join(STYLES)}")
    check_lines(lines, scene.id)
    img = render_scene(scene)
    if not lines:
        return img
    if any(o.y + o.radius >= band_top(len(lines)) for o in scene.objects):
        raise LayoutError(f"{scene.id}: an object reaches into the text band (rows >= {band_top(len(lines))})")
    draw = ImageDraw.Draw(img)
    ys = line_ys(len(lines))
    fill = TEXT_COLOUR
    if style == "card":
        draw.rectangle([0, ys[0] + 1, IMAGE_SIZE - 1, IMAGE_SIZE - 1], fill=CARD_FILL)
        fill = CARD_TEXT
    for y, line in zip(ys, lines, strict=True):
        draw.text((TEXT_X, y), line, fill=fill, font=_font())
    return img


def text_band_cells(n_lines: int) -> int:
    """How many rows of the tower's 8x8 token grid the text band touches (for the docs' layout note)."""
    return -(-(IMAGE_SIZE - band_top(n_lines)) // CELL)

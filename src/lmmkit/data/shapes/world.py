"""ShapesWorld scene graphs: which objects a scene holds, where, and with what rendered text.

The world's structure (object frequencies, co-occurrence, held-out pairs) is fixed by
`WORLD_SEED`, so every dataset generated with any seed lives in the same world; the data seed
only decides which scenes are drawn. Held-out scenes each contain at least one pair of objects
that never appears together in a training scene, so held-out scores measure generalisation to
unseen combinations.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "pink": (250, 140, 200),
    "cyan": (40, 210, 220),
}
WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "BOX", "CAR", "MAP", "KEY", "HAT", "CUP", "BUS", "PEN", "TOY")

IMAGE_SIZE = 64
CELL = 8  # the tower's token grid: an 8x8 grid of 8-pixel cells
GRID = IMAGE_SIZE // CELL
OBJECT_AREA_HEIGHT = 50  # objects live above this row; rendered text lives below it
WORLD_SEED = 1234
HELD_OUT_PAIR_SHARE = 0.08

CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: int  # centre, pixels
    y: int
    radius: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def cell(self) -> tuple[int, int]:
        return (self.y // CELL, self.x // CELL)

    @property
    def position(self) -> str:
        """Coarse position words: 'top left', 'middle', 'bottom right', ..."""
        col = "left" if self.x < IMAGE_SIZE / 3 else "right" if self.x >= 2 * IMAGE_SIZE / 3 else ""
        row = (
            "top"
            if self.y < OBJECT_AREA_HEIGHT / 3
            else "bottom"
            if self.y >= 2 * OBJECT_AREA_HEIGHT / 3
            else "middle"
        )
        if row == "middle" and col:
            return col
        return f"{row} {col}".strip()


@dataclass
class Scene:
    id: str
    objects: list[SceneObject]
    text: str | None = None  # a word rendered in the bottom strip
    text_x: int = 0
    background: tuple[int, int, int] = (30, 30, 36)
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "objects": [asdict(o) for o in self.objects],
            "text": self.text,
            "text_x": self.text_x,
            "background": list(self.background),
        }

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        return cls(
            id=d["id"],
            objects=[SceneObject(**o) for o in d["objects"]],
            text=d.get("text"),
            text_x=d.get("text_x", 0),
            background=tuple(d.get("background", (30, 30, 36))),
        )


class World:
    """The fixed structure of ShapesWorld: class frequencies, co-occurrence and held-out pairs."""

    def __init__(self, seed: int = WORLD_SEED) -> None:
        rng = random.Random(seed)
        order = list(CLASSES)
        rng.shuffle(order)
        # Zipf-like frequencies, so POPE's "popular" negatives differ from "random" ones.
        self.weights = {name: 1.0 / (rank + 6) ** 0.9 for rank, name in enumerate(order)}
        pairs = list(itertools.combinations(sorted(CLASSES), 2))
        rng.shuffle(pairs)
        self.held_out_pairs: set[frozenset[str]] = {
            frozenset(p) for p in pairs[: int(len(pairs) * HELD_OUT_PAIR_SHARE)]
        }

    def has_held_out_pair(self, names: list[str]) -> bool:
        return any(frozenset(p) in self.held_out_pairs for p in itertools.combinations(names, 2))

    def _draw_class(self, rng: random.Random, first: str | None, exclude: set[str]) -> str:
        """Objects tend to share a colour or a shape with the first one (co-occurrence structure)."""
        candidates = [c for c in CLASSES if c not in exclude]
        if first is not None:
            colour, shape = first.split(" ")
            u = rng.random()
            if u < 0.35:
                same = [c for c in candidates if c.startswith(colour + " ")]
                candidates = same or candidates
            elif u < 0.6:
                same = [c for c in candidates if c.endswith(" " + shape)]
                candidates = same or candidates
        return rng.choices(candidates, weights=[self.weights[c] for c in candidates])[0]

    def sample_scene(self, rng: random.Random, scene_id: str, held_out: bool, min_objects: int = 1,
                     max_objects: int = 5, text_probability: float = 0.3) -> Scene:
        """Draw one scene. Training scenes avoid every held-out pair; held-out scenes contain one."""
        while True:
            n = rng.randint(min_objects, max_objects)
            if held_out:
                n = max(n, 2)
                names = sorted(rng.choice(sorted(self.held_out_pairs, key=sorted)))  # not list(frozenset): hash order
                rng.shuffle(names)
            else:
                names = [self._draw_class(rng, None, set())]
            while len(names) < n:
                names.append(self._draw_class(rng, names[0], set(names)))
            if held_out or not self.has_held_out_pair(names):
                objects = _place(rng, names)
                if objects is not None:
                    break
        text = rng.choice(WORDS) if rng.random() < text_probability else None
        text_x = rng.randint(2, 30) if text else 0
        shade = rng.randint(20, 45)
        return Scene(scene_id, objects, text, text_x, (shade, shade, shade + rng.randint(0, 10)))


def _place(rng: random.Random, names: list[str], tries: int = 200) -> list[SceneObject] | None:
    """Non-overlapping objects whose centres fall in distinct cells of the token grid."""
    placed: list[SceneObject] = []
    for name in names:
        colour, shape = name.split(" ")
        for _ in range(tries):
            r = rng.randint(5, 8)
            x = rng.randint(r + 1, IMAGE_SIZE - r - 2)
            y = rng.randint(r + 1, OBJECT_AREA_HEIGHT - r - 1)
            obj = SceneObject(colour, shape, x, y, r)
            if all(
                (o.x - x) ** 2 + (o.y - y) ** 2 > (o.radius + r + 2) ** 2 and o.cell != obj.cell
                for o in placed
            ):
                placed.append(obj)
                break
        else:
            return None
    return placed

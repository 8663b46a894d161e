"""Shared pieces of the ShapesWorld benchmark twins: constants, atomic file writes, image copies,
per-task random streams and scene facts."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from lmmkit.atomic import atomic_write
from lmmkit.data.english import plural
from lmmkit.data.shapes.text import NUMBER_WORDS
from lmmkit.data.shapes.world import CLASSES, IMAGE_SIZE, OBJECT_AREA_HEIGHT, Scene

TASKS: tuple[str, ...] = ("pope", "mme", "mmmu", "mathvista", "mmvet", "mmhal", "chair", "lmloss")
DEFAULT_SIZES: dict[str, int] = {"mme": 100, "mmmu": 120, "mathvista": 100, "mmvet": 60, "mmhal": 48, "chair": 100}
MME_SUBTASKS: tuple[str, ...] = ("existence", "count", "position", "color")
MME_SUFFIX = " Please answer yes or no."
MMMU_SUBJECTS: dict[str, str] = {"Shapes_Colour": "Colour recognition", "Shapes_Count": "Counting",
                                 "Shapes_Word": "Text recognition"}
MMMU_OPEN_SHARE = 0.2
MMHAL_TYPES: tuple[str, ...] = ("attribute", "adversarial", "comparison", "counting", "relation", "environment",
                                "holistic", "other")
SIDE_WORDS: dict[str, str] = {"left": "on the left of", "right": "on the right of", "top": "at the top of",
                              "bottom": "at the bottom of"}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SIDE_MARGIN = 3  # px an object's centre keeps from a third's boundary before we ask which side it is on
MIN_GAP = 10  # px apart two objects must be before MMHal asks which is higher / further left

README = """# ShapesWorld benchmark twins (lmmkit)

These are lmmkit's ShapesWorld twins, **not** the real POPE, MME, MMMU, MathVista, MM-Vet,
MMHal-Bench or CHAIR on COCO: synthetic questions about held-out ShapesWorld test scenes (MathVista: small bar charts)
in each benchmark's official file format, so every task runs offline. Scores on them say nothing
about the real benchmarks. Written by `lmmkit.data.shapes.bench.write_bench` with seed {seed}.
"""


# ---- Files ----

def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class _Images:
    """One task's image folder: each image is written once; `prune` drops files this run did not write."""

    def __init__(self, folder: Path, source: Path | None = None) -> None:
        self.folder, self.source, self.written = folder, source, set[str]()

    def copy(self, rel: str, name: str | None = None) -> str:
        """Copy source/rel to folder/name (default: its basename); returns the name."""
        name = name or Path(rel).name
        if name not in self.written:
            assert self.source is not None
            _write_bytes(self.folder / name, (self.source / rel).read_bytes())
            self.written.add(name)
        return name

    def save(self, img: Image.Image, name: str) -> None:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _write_bytes(self.folder / name, buf.getvalue())
        self.written.add(name)

    def prune(self) -> None:
        if self.folder.is_dir():
            for p in sorted(self.folder.rglob("*")):
                if p.is_file() and p.relative_to(self.folder).as_posix() not in self.written:
                    p.unlink()


class _Stream:
    """The scenes in a fresh random order on every pass; `take` returns the next one a builder accepts."""

    def __init__(self, rng: random.Random, scenes: list[Scene]) -> None:
        self.rng, self.scenes, self.queue = rng, scenes, list[Scene]()

    def take(self, build: Callable[[random.Random, Scene], Any]) -> tuple[Scene, Any] | None:
        for _ in range(len(self.scenes)):
            if not self.queue:
                self.queue = self.rng.sample(self.scenes, len(self.scenes))
            scene = self.queue.pop()
            item = build(self.rng, scene)
            if item is not None:
                return scene, item
        return None


# ---- Scene facts ----

def _unique(scene: Scene, attr: str) -> list[str]:
    """Shapes (attr "shape") or colours that appear exactly once in the scene, in first-seen order."""
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [v for v in counts if counts[v] == 1]


def _absent(rng: random.Random, scene: Scene) -> str:
    """An object not in the scene, sharing a colour or shape with one that is (the hard kind)."""
    present = set(scene.names)
    anchor = rng.choice(scene.objects)
    pool = [c for c in CLASSES if c not in present and (c.startswith(anchor.colour + " ")
                                                         or c.endswith(" " + anchor.shape))]
    return rng.choice(pool or [c for c in CLASSES if c not in present])


def sides(x: int, y: int) -> list[str]:
    """The sides ("left", "right", "top", "bottom") an object centre is clearly on (SceneObject.position
    thirds, with SIDE_MARGIN px to spare)."""
    out = []
    if x < IMAGE_SIZE / 3 - SIDE_MARGIN:
        out.append("left")
    elif x >= 2 * IMAGE_SIZE / 3 + SIDE_MARGIN:
        out.append("right")
    if y < OBJECT_AREA_HEIGHT / 3 - SIDE_MARGIN:
        out.append("top")
    elif y >= 2 * OBJECT_AREA_HEIGHT / 3 + SIDE_MARGIN:
        out.append("bottom")
    return out


def _number(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"



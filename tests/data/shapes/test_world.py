"""ShapesWorld scene graphs and rendering: determinism, held-out pairs, placement, pixel truth."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from lmmkit.data.shapes.render import dense_labels, render_scene
from lmmkit.data.shapes.world import (
    CLASSES,
    COLOURS,
    IMAGE_SIZE,
    OBJECT_AREA_HEIGHT,
    SHAPES,
    WORDS,
    Scene,
    World,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _scenes(world: World, seed: int, n: int, held_out: bool, min_objects: int = 1) -> list[Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng, f"s{i}", held_out=held_out, min_objects=min_objects) for i in range(n)]


def test_world_structure_is_fixed(world: World) -> None:
    other = World()
    assert other.weights == world.weights
    assert other.held_out_pairs == world.held_out_pairs
    assert len(CLASSES) == len(COLOURS) * len(SHAPES)
    assert 0 < len(world.held_out_pairs) < len(CLASSES) * (len(CLASSES) - 1) // 2
    assert all(len(p) == 2 and p <= set(CLASSES) for p in world.held_out_pairs)


@pytest.mark.parametrize("held_out", [False, True])
def test_same_seed_same_scenes_other_seed_differs(world: World, held_out: bool) -> None:
    a = [s.to_json() for s in _scenes(world, 7, 50, held_out)]
    assert a == [s.to_json() for s in _scenes(world, 7, 50, held_out)]
    assert a != [s.to_json() for s in _scenes(world, 8, 50, held_out)]


def test_scenes_do_not_depend_on_string_hashing() -> None:
    """Held-out scenes start from a frozenset pair: its order must not follow PYTHONHASHSEED."""
    code = (
        "import random, json\n"
        "from lmmkit.data.shapes.world import World\n"
        "w = World(); r = random.Random(0)\n"
        "print(json.dumps([w.sample_scene(r, str(i), True, 3).to_json() for i in range(20)]))\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                       capture_output=True, text=True, check=True).stdout
        for h in ("1", "2")
    }
    assert len(outs) == 1


def test_held_out_pairs(world: World) -> None:
    for scene in _scenes(world, 1, 300, held_out=False):
        assert not world.has_held_out_pair(scene.names)
        assert 1 <= len(scene.objects) <= 5
    for scene in _scenes(world, 2, 300, held_out=True, min_objects=3):
        assert world.has_held_out_pair(scene.names)
        assert 3 <= len(scene.objects) <= 5


@pytest.mark.parametrize("held_out", [False, True])
def test_objects_distinct_cells_no_overlap_inside_object_area(world: World, held_out: bool) -> None:
    for scene in _scenes(world, 3, 300, held_out):
        assert len(set(scene.names)) == len(scene.names)  # distinct classes
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        for a, b in itertools.combinations(scene.objects, 2):
            assert (a.x - b.x) ** 2 + (a.y - b.y) ** 2 > (a.radius + b.radius) ** 2
        for o in scene.objects:
            assert 0 <= o.x - o.radius and o.x + o.radius < IMAGE_SIZE
            assert 0 <= o.y - o.radius and o.y + o.radius < OBJECT_AREA_HEIGHT
        assert scene.text is None or scene.text in WORDS


def test_scene_json_round_trip(world: World) -> None:
    for scene in _scenes(world, 4, 30, held_out=True):
        back = Scene.from_json(scene.to_json())
        assert back.to_json() == scene.to_json()
        assert back.names == scene.names


def test_render_matches_scene_truth(world: World) -> None:
    for scene in _scenes(world, 5, 100, held_out=False):
        img = render_scene(scene)
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"
        pixels = np.asarray(img)
        for o in scene.objects:
            if o.shape != "ring":  # a ring's centre is background
                assert tuple(pixels[o.y, o.x]) == COLOURS[o.colour], (scene.id, o)
        colour, shape, word = dense_labels(scene)
        assert int((colour > 0).sum()) == len(scene.objects) == int((shape > 0).sum())
        for o in scene.objects:
            row, col = o.cell
            assert list(COLOURS)[colour[row, col] - 1] == o.colour
            assert SHAPES[shape[row, col] - 1] == o.shape
        assert word == (WORDS.index(scene.text) + 1 if scene.text else 0)
    assert np.array_equal(np.asarray(render_scene(scene)), pixels)  # rendering is deterministic

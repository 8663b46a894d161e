"""ShapesWorld dataset on disk: layout, determinism, held-out split, LLaVA JSON and POPE files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lmmkit.data.shapes.generate as gen
from lmmkit import IMAGE_TOKEN
from lmmkit.data.formats.llava import read_llava
from lmmkit.data.shapes.generate import ShapesDataset, _write_atomic, generate_shapes, load_scenes
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.text import short_caption
from lmmkit.data.shapes.world import CLASSES, World
from lmmkit.eval.pope import OFFICIAL_KEYS, question_text, read_pope_jsonl

N_TRAIN, N_TEST, N_POPE = 40, 20, 10
SMALL = {"n_train": N_TRAIN, "n_test": N_TEST, "n_pope_images": N_POPE, "progress": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ShapesDataset:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds", seed=0, workers=2, **SMALL)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_world_json(dataset: ShapesDataset) -> None:
    root = dataset.root
    assert (dataset.n_train, dataset.n_test, dataset.n_pope_images) == (N_TRAIN, N_TEST, N_POPE)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        names = sorted(p.name for p in (root / "images" / split).iterdir())
        assert names == [f"{i:06d}.png" for i in range(n)]
    for path in dataset.files():
        assert path.is_file() and path.is_relative_to(root)
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]
    meta = json.loads(dataset.world_json.read_text())
    assert meta["seed"] == 0 and meta["lmmkit_version"]
    assert meta["counts"]["train"] == N_TRAIN and meta["counts"]["test"] == N_TEST
    assert meta["counts"]["pope_images"] == N_POPE
    assert meta["held_out_pairs"] == len(World().held_out_pairs)
    assert all((root / f).is_file() for f in meta["files"])
    again = ShapesDataset.at(root)
    assert again.files() == dataset.files() and again.n_train == N_TRAIN


def test_images_match_scenes(dataset: ShapesDataset) -> None:
    for split_file in (dataset.train_scenes, dataset.test_scenes):
        for scene in load_scenes(split_file)[:5]:
            with Image.open(dataset.image_folder / scene.extra["image"]) as img:
                assert img.size == (64, 64)
                assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(render_scene(scene)))


def test_held_out_split(dataset: ShapesDataset) -> None:
    world = World()
    train, test = load_scenes(dataset.train_scenes), load_scenes(dataset.test_scenes)
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert not any(world.has_held_out_pair(s.names) for s in train)
    assert all(world.has_held_out_pair(s.names) and len(s.objects) >= 3 for s in test)
    assert [s.extra["image"] for s in train] == [f"train/{i:06d}.png" for i in range(N_TRAIN)]


def test_llava_files_read_back(dataset: ShapesDataset) -> None:
    scenes = {s.id: s for f in (dataset.train_scenes, dataset.test_scenes) for s in load_scenes(f)}
    for path, n, turns in (
        (dataset.train_captions, N_TRAIN, (1, 1)),
        (dataset.train_conversations, N_TRAIN, (2, 4)),
        (dataset.test_conversations, N_TEST, (2, 4)),
    ):
        records = list(read_llava(path, dataset.image_folder, policy="stop", open_images=True))
        assert len(records) == n
        for rec in records:
            scene = scenes[rec.id]
            assert rec.images == [(dataset.image_folder / scene.extra["image"]).resolve()]
            assert rec.image_tag_count() == 1 and rec.messages[0].content.startswith(IMAGE_TOKEN)
            assert turns[0] <= len(rec.messages) // 2 <= turns[1]
            if path == dataset.train_captions:
                assert rec.messages[1].content == short_caption(scene)


def test_pope_files(dataset: ShapesDataset) -> None:
    scenes = {s.extra["image"]: s for s in load_scenes(dataset.test_scenes)}
    images_per_split = []
    for split, path in dataset.pope.items():
        rows = read_pope_jsonl(path)
        assert len(rows) == 6 * N_POPE, split
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(tuple(r) == OFFICIAL_KEYS for r in rows)
        for k in range(0, len(rows), 6):
            group = rows[k:k + 6]
            image = group[0]["image"]
            assert all(r["image"] == image for r in group)
            assert [r["label"] for r in group] == ["yes", "no"] * 3
            names = scenes[image].names
            by_text = {question_text(o): o for o in CLASSES}
            objects = [by_text[r["text"]] for r in group]
            assert objects[0::2] == names[:3]
            negatives = objects[1::2]
            assert len(set(negatives)) == 3 and not set(negatives) & set(names)
        images_per_split.append([r["image"] for r in rows[::6]])
    assert len(set(images_per_split[0])) == N_POPE
    assert images_per_split[0] == images_per_split[1] == images_per_split[2]


def test_deterministic_whatever_the_workers_and_seed_matters(dataset: ShapesDataset, tmp_path: Path) -> None:
    other = tmp_path / "ds"
    generate_shapes(other, seed=0, workers=1, **SMALL)
    assert _all_files(other) == _all_files(dataset.root)
    # Another seed, smaller, into the same folder: different data, no stale images left behind.
    generate_shapes(other, seed=1, workers=1, **{**SMALL, "n_train": 30})
    files = _all_files(other)
    assert len([f for f in files if f.startswith("images/train/")]) == 30
    base = _all_files(dataset.root)
    for name in ("train/scenes.jsonl", "test/scenes.jsonl", "test/pope_random.jsonl", "images/train/000000.png"):
        assert files[name] != base[name], name


def test_interrupted_run_leaves_no_partial_files(dataset: ShapesDataset, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.jsonl"
    target.write_text("old\n")

    def lines():
        yield "new\n"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomic(target, lines())
    assert target.read_text() == "old\n" and list(tmp_path.iterdir()) == [target]

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "build_pope", boom)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(out, seed=0, workers=1, **SMALL)
    assert not (out / "world.json").exists()  # world.json marks a complete dataset
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    json.loads((out / "train" / "conversations.json").read_text())  # whole, valid JSON


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft_turns"):
        generate_shapes(tmp_path, sft_turns=(4, 2), **SMALL)
    with pytest.raises(ValueError, match="workers"):
        generate_shapes(tmp_path, workers=0, **SMALL)

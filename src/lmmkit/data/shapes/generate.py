"""Write a ShapesWorld dataset to disk: images, scene truth, LLaVA JSON and POPE question files.

Layout under `out` (image paths in every file are relative to `out/images`)::

    images/train/000000.png ...       images/test/000000.png ...
    train/scenes.jsonl                test/scenes.jsonl           (Scene.to_json + "image")
    train/captions.json               (alignment data: one short caption per image)
    train/conversations.json          (SFT data: one multi-turn conversation per image)
    test/conversations.json           (LM-loss evaluation)
    test/pope_{random,popular,adversarial}.jsonl
    world.json                        (written last: its presence marks a complete dataset)

Training scenes never contain a held-out pair of objects; every test scene contains one, so the
test split measures generalisation to unseen combinations. Everything is decided by `seed` in the
parent process before any image is rendered, so the files do not depend on `workers`.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmmkit import __version__
from lmmkit.atomic import atomic_open
from lmmkit.data.formats.llava import write_llava
from lmmkit.data.schema import ConversationRecord
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.text import caption_conversation, conversation
from lmmkit.data.shapes.world import IMAGE_SIZE, WORLD_SEED, Scene, World
from lmmkit.eval.pope import build_pope, write_pope_jsonl

SPLIT_NAMES: tuple[str, ...] = ("train", "test")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")
_CHUNK = 64  # at most this many images per task sent to a worker


@dataclass
class ShapesDataset:
    """What `generate_shapes` wrote: the paths (all under `root`) and the counts."""

    root: Path
    image_folder: Path
    train_scenes: Path
    test_scenes: Path
    train_captions: Path
    train_conversations: Path
    test_conversations: Path
    pope: dict[str, Path]
    world_json: Path
    n_train: int = 0
    n_test: int = 0
    n_pope_images: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path) -> ShapesDataset:
        """The paths of a dataset folder written by `generate_shapes` (counts from its world.json)."""
        root = Path(root)
        ds = cls(
            root=root,
            image_folder=root / "images",
            train_scenes=root / "train" / "scenes.jsonl",
            test_scenes=root / "test" / "scenes.jsonl",
            train_captions=root / "train" / "captions.json",
            train_conversations=root / "train" / "conversations.json",
            test_conversations=root / "test" / "conversations.json",
            pope={s: root / "test" / f"pope_{s}.jsonl" for s in POPE_SPLITS},
            world_json=root / "world.json",
        )
        if ds.world_json.is_file():
            counts = json.loads(ds.world_json.read_text(encoding="utf-8")).get("counts", {})
            ds.n_train = int(counts.get("train", 0))
            ds.n_test = int(counts.get("test", 0))
            ds.n_pope_images = int(counts.get("pope_images", 0))
        return ds

    def files(self) -> list[Path]:
        """Every non-image file of the dataset, world.json last."""
        return [self.train_scenes, self.test_scenes, self.train_captions, self.train_conversations,
                self.test_conversations, *self.pope.values(), self.world_json]


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    with atomic_open(path) as f:
        for line in lines:
            f.write(line)


def _render_chunk(items: Sequence[tuple[dict, str]]) -> int:
    """Worker: render scenes (as JSON dicts) and save each PNG atomically. Returns how many."""
    for scene_json, path in items:
        buf = io.BytesIO()
        render_scene(Scene.from_json(scene_json)).save(buf, format="PNG")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
        os.replace(tmp, path)
    return len(items)


def _render_all(jobs: list[tuple[dict, str]], workers: int, progress: bool) -> None:
    size = max(1, min(_CHUNK, -(-len(jobs) // (4 * workers))))  # small runs still use every worker
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    with tqdm(total=len(jobs), desc="render shapes", unit="img", disable=not progress, leave=False) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                bar.update(_render_chunk(chunk))
            return
        # spawn, not fork: the caller may hold threads (torch, tqdm's monitor) that fork would copy.
        with mp.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
            for n in pool.imap_unordered(_render_chunk, chunks):
                bar.update(n)


def _remove_stale_images(folder: Path, n: int) -> None:
    """Drop NNNNNN.png files left by an earlier, larger run in the same folder (and stray temps)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if (_IMAGE_NAME.match(p.name) and int(p.name[:6]) >= n) or p.name.endswith(".png.tmp"):
            p.unlink(missing_ok=True)


def _records(rng: random.Random, world: World, scenes: list[Scene], paths: list[Path], kind: str,
             sft_turns: tuple[int, int]) -> list[ConversationRecord]:
    """One caption (`kind` "caption") or one multi-turn conversation per scene, as records."""
    out = []
    for scene, path in zip(scenes, paths, strict=True):
        if kind == "caption":
            messages = caption_conversation(rng, scene)
        else:
            messages = conversation(rng, world, scene, rng.randint(*sft_turns))
        out.append(ConversationRecord(id=scene.id, messages=messages, images=[path]))
    return out


def generate_shapes(out: Path, seed: int = 0, n_train: int = 8000, n_test: int = 600, n_pope_images: int = 300,
                    sft_turns: tuple[int, int] = (2, 4), workers: int = 2, progress: bool = True) -> ShapesDataset:
    """Generate a ShapesWorld dataset under `out` (see the module docstring for the layout).

    Deterministic by `seed`, whatever `workers` is. `n_pope_images` is capped at `n_test`.
    Every JSON file appears atomically and world.json is written last. Returns the paths and counts.
    """
    if n_train < 0 or n_test < 0 or n_pope_images < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train}, n_test={n_test}, "
                         f"n_pope_images={n_pope_images}")
    lo, hi = sft_turns
    if not 1 <= lo <= hi:
        raise ValueError(f"sft_turns must be (min, max) with 1 <= min <= max, got {sft_turns}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_pope_images = min(n_pope_images, n_test)

    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    ds = ShapesDataset.at(out)
    ds.n_train, ds.n_test, ds.n_pope_images = n_train, n_test, n_pope_images
    ds.world_json.unlink(missing_ok=True)  # the dataset is incomplete until it is written again

    # 1. All scene graphs, in the parent. Independent streams per split and purpose, so e.g. the
    #    first 40 train scenes are the same whatever n_train or n_test is.
    world = World()
    counts = {"train": n_train, "test": n_test}
    scenes: dict[str, list[Scene]] = {}
    rel: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        rng = random.Random(f"{seed}/{split}/scenes")
        held_out = split == "test"
        scenes[split] = [
            world.sample_scene(rng, f"{split}-{i:06d}", held_out=held_out, min_objects=3 if held_out else 1,
                               max_objects=5)
            for i in range(counts[split])
        ]
        rel[split] = [f"{split}/{i:06d}.png" for i in range(counts[split])]
    timings["scenes"] = time.perf_counter() - start

    # 2. Images, in parallel.
    t = time.perf_counter()
    jobs: list[tuple[dict, str]] = []
    for split in SPLIT_NAMES:
        folder = ds.image_folder / split
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_images(folder, counts[split])
        jobs += [(s.to_json(), str(ds.image_folder / r)) for s, r in zip(scenes[split], rel[split], strict=True)]
    _render_all(jobs, workers, progress)
    timings["images"] = time.perf_counter() - t

    # 3. Scene truth, LLaVA JSON, POPE.
    t = time.perf_counter()
    for split, path in (("train", ds.train_scenes), ("test", ds.test_scenes)):
        _write_atomic(path, (json.dumps({**s.to_json(), "image": r}) + "\n"
                             for s, r in zip(scenes[split], rel[split], strict=True)))
    abs_paths = {split: [ds.image_folder / r for r in rel[split]] for split in SPLIT_NAMES}
    write_llava(_records(random.Random(f"{seed}/train/captions"), world, scenes["train"], abs_paths["train"],
                         "caption", sft_turns), ds.train_captions, ds.image_folder)
    write_llava(_records(random.Random(f"{seed}/train/conversations"), world, scenes["train"], abs_paths["train"],
                         "conversation", sft_turns), ds.train_conversations, ds.image_folder)
    write_llava(_records(random.Random(f"{seed}/test/conversations"), world, scenes["test"], abs_paths["test"],
                         "conversation", sft_turns), ds.test_conversations, ds.image_folder)
    pope = build_pope([(r, s.names) for s, r in zip(scenes["test"], rel["test"], strict=True)],
                      n_images=n_pope_images, seed=seed, splits=POPE_SPLITS)
    for split, rows in pope.items():
        write_pope_jsonl(rows, ds.pope[split], extra_keys=False)

    meta = {
        "lmmkit_version": __version__,
        "seed": seed,
        "world_seed": WORLD_SEED,
        "image_size": IMAGE_SIZE,
        "counts": {"train": n_train, "test": n_test, "pope_images": n_pope_images,
                   "pope_questions": {s: len(rows) for s, rows in pope.items()}},
        "held_out_pairs": len(world.held_out_pairs),
        "sft_turns": [lo, hi],
        "image_folder": "images",
        "images": {split: f"images/{split}/NNNNNN.png" for split in SPLIT_NAMES},
        "files": [p.relative_to(out).as_posix() for p in ds.files()],
    }
    _write_atomic(ds.world_json, [json.dumps(meta, indent=2) + "\n"])
    timings["files"] = time.perf_counter() - t
    ds.seconds = time.perf_counter() - start
    ds.timings = timings
    return ds


def load_scenes(path: Path) -> list[Scene]:
    """Read a scenes.jsonl file; each Scene's image path (relative to images/) is in `extra["image"]`."""
    scenes = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            scene = Scene.from_json(d)
            if "image" in d:
                scene.extra["image"] = d["image"]
            scenes.append(scene)
    return scenes

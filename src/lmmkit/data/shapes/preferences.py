"""ShapesWorld preference pairs: a faithful answer (chosen) and one with an injected hallucination
(rejected), both derived from the exact scene truth.

Hallucination kinds, each the kind POPE and CHAIR measure:

* ``object``  - the rejected caption names an object that is not in the scene (a hard one: it
                shares a colour or a shape with a present object), or says "yes" to it;
* ``colour``  - the rejected caption gives one object the wrong colour;
* ``count``   - the rejected answer gives the wrong number of objects;
* ``denial``  - the rejected answer says "no" to an object that is there (so the pairs do not
                teach "always say no").

Prompts use the SFT data's phrasings (caption requests and short-answer questions), so DPO
adjusts answers the model already gives rather than teaching a new format.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lmmkit import IMAGE_TOKEN
from lmmkit.data.english import article
from lmmkit.data.preference import PreferenceRecord
from lmmkit.data.schema import Message
from lmmkit.data.shapes.text import (
    CAPTION_PROMPTS,
    DETAIL_PROMPTS,
    NUMBER_WORDS,
    SHORT_ANSWER,
    detailed_caption,
)
from lmmkit.data.shapes.world import CLASSES, COLOURS, Scene, World

KINDS: tuple[str, ...] = ("object", "colour", "count", "denial")
DEFAULT_MIX: dict[str, float] = {"object": 0.45, "colour": 0.2, "count": 0.1, "denial": 0.25}


def hard_absent(rng: random.Random, world: World, scene: Scene) -> str:
    """An absent object sharing a colour or a shape with a present one (POPE-adversarial-like)."""
    present = set(scene.names)
    anchor = rng.choice(scene.objects)
    pool = [c for c in CLASSES if c not in present
            and (c.startswith(anchor.colour + " ") or c.endswith(" " + anchor.shape))]
    pool = pool or [c for c in CLASSES if c not in present]
    return rng.choices(pool, weights=[world.weights[c] for c in pool])[0]


def _caption_list(names: Sequence[str]) -> str:
    return ", ".join(names) + "."


def _object_pair(rng: random.Random, world: World, scene: Scene) -> tuple[str, str, str]:
    extra = hard_absent(rng, world, scene)
    if rng.random() < 0.5:
        q = f"Is there {article(extra)} {extra} in the image?\n{SHORT_ANSWER}"
        return q, "No", "Yes"
    names = list(scene.names)
    fake = names.copy()
    fake.insert(rng.randint(0, len(fake)), extra)
    return rng.choice(CAPTION_PROMPTS), _caption_list(names), _caption_list(fake)


def _colour_pair(rng: random.Random, world: World, scene: Scene) -> tuple[str, str, str]:
    names = list(scene.names)
    k = rng.randrange(len(names))
    colour, shape = names[k].split(" ")
    options = [c for c in COLOURS if c != colour and f"{c} {shape}" not in names]
    fake = names.copy()
    fake[k] = f"{rng.choice(options)} {shape}"
    if rng.random() < 0.5:
        return rng.choice(CAPTION_PROMPTS), _caption_list(names), _caption_list(fake)
    truth = detailed_caption(scene)
    return rng.choice(DETAIL_PROMPTS), truth, truth.replace(names[k], fake[k], 1)


def _count_pair(rng: random.Random, world: World, scene: Scene) -> tuple[str, str, str]:
    n = len(scene.objects)
    wrong = rng.choice([m for m in range(1, len(NUMBER_WORDS)) if m != n])
    return f"How many objects are there?\n{SHORT_ANSWER}", str(n), str(wrong)


def _denial_pair(rng: random.Random, world: World, scene: Scene) -> tuple[str, str, str]:
    name = rng.choice(scene.names)
    return f"Is there {article(name)} {name} in the image?\n{SHORT_ANSWER}", "Yes", "No"


_MAKERS = {"object": _object_pair, "colour": _colour_pair, "count": _count_pair, "denial": _denial_pair}


def preference_pair(rng: random.Random, world: World, scene: Scene, image: str | Path, kind: str) -> PreferenceRecord:
    """One pair of the given hallucination kind about `scene` (whose image file is `image`)."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown hallucination kind {kind!r}; choose from {', '.join(KINDS)}")
    prompt, chosen, rejected = _MAKERS[kind](rng, world, scene)
    return PreferenceRecord(id=f"{scene.id}-{kind}", prompt=[Message("user", f"{IMAGE_TOKEN}\n{prompt}")],
                            chosen=chosen, rejected=rejected, images=[image])


def preference_pairs(scenes: Sequence[Scene], images: Sequence[str | Path], seed: int = 0,
                     mix: dict[str, float] | None = None) -> list[PreferenceRecord]:
    """One pair per scene, its kind drawn from `mix` (seeded)."""
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown hallucination kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    world = World()
    kinds, weights = list(mix), [mix[k] for k in mix]
    return [preference_pair(rng, world, scene, image, rng.choices(kinds, weights=weights)[0])
            for scene, image in zip(scenes, images, strict=True)]


def write_shapes_preferences(data_dir: Path, out: Path, seed: int = 0, limit: int | None = None,
                             mix: dict[str, float] | None = None) -> int:
    """Pairs for the training scenes of a `generate_shapes` folder, written as chosen/rejected JSON with
    image paths relative to `data_dir/images`. Returns how many were written."""
    from lmmkit.data.formats.preference import write_preferences
    from lmmkit.data.shapes.generate import load_scenes

    data_dir = Path(data_dir)
    scenes = load_scenes(data_dir / "train" / "scenes.jsonl")[:limit]
    images = [data_dir / "images" / s.extra["image"] for s in scenes]
    return write_preferences(preference_pairs(scenes, images, seed=seed, mix=mix), out, data_dir / "images")

"""ShapesWorld preference pairs: chosen agrees with the scene truth; rejected holds exactly the
hallucination its kind names."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from lmmkit.data.shapes.preferences import KINDS, preference_pair, preference_pairs
from lmmkit.data.shapes.world import COLOURS, SHAPES, World

_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def _mentioned(text: str) -> set[str]:
    return {f"{c} {s}" for c, s in _OBJECT.findall(text)}


def _asked(prompt: str) -> str | None:
    m = re.search(r"Is there an? (\w+ \w+) in the image\?", prompt)
    return m.group(1) if m else None


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_faithful_versus_hallucinated(kind):
    world, rng = World(), random.Random(3)
    for k in range(150):
        scene = world.sample_scene(rng, f"s{k}", held_out=False)
        rec = preference_pair(rng, world, scene, "x.png", kind)
        rec.validate()
        prompt = rec.prompt[0].content
        assert prompt.startswith("<image>\n")
        present = set(scene.names)
        asked = _asked(prompt)
        if asked is not None:  # a yes/no question: chosen is the truth, rejected its negation
            truth = "Yes" if asked in present else "No"
            assert rec.chosen == truth and rec.rejected == {"Yes": "No", "No": "Yes"}[truth]
            assert (asked in present) == (kind == "denial")
        elif kind == "count":
            assert rec.chosen == str(len(scene.objects)) and rec.rejected != rec.chosen
            assert int(rec.rejected) >= 1
        else:  # captions: chosen names exactly the scene's objects; rejected adds or recolours one
            assert _mentioned(rec.chosen) == present
            fake = _mentioned(rec.rejected) - present
            assert len(fake) == 1
            if kind == "object":
                assert _mentioned(rec.rejected) >= present
                (extra,) = fake
                assert any(extra.split()[0] == o.colour or extra.split()[1] == o.shape for o in scene.objects)
            else:  # colour: same number of objects, one shape keeps its place with another colour
                assert len(_mentioned(rec.rejected) & present) == len(present) - 1


def test_pairs_follow_the_mix_and_are_seeded():
    world, rng = World(), random.Random(0)
    scenes = [world.sample_scene(rng, f"s{k}", held_out=False) for k in range(400)]
    images = [f"{k}.png" for k in range(400)]
    a = preference_pairs(scenes, images, seed=1)
    b = preference_pairs(scenes, images, seed=1)
    assert [(r.id, r.chosen, r.rejected) for r in a] == [(r.id, r.chosen, r.rejected) for r in b]
    kinds = Counter(r.id.rsplit("-", 1)[1] for r in a)
    assert set(kinds) == set(KINDS)
    assert 0.35 < kinds["object"] / 400 < 0.55
    only = preference_pairs(scenes[:20], images[:20], mix={"count": 1.0})
    assert all(r.id.endswith("-count") for r in only)
    with pytest.raises(ValueError, match="unknown hallucination kind"):
        preference_pairs(scenes[:2], images[:2], mix={"made-up": 1.0})

"""ShapesWorld language: every answer agrees with the scene truth; captions name exactly its objects."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from lmmkit import IMAGE_TOKEN
from lmmkit.data.shapes.text import (
    NUMBER_WORDS,
    OBJECT_TOKENS,
    SHORT_ANSWER,
    caption_conversation,
    conversation,
    detailed_caption,
    short_caption,
    symbolic_scene,
)
from lmmkit.data.shapes.world import COLOURS, SHAPES, Scene, World

_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def mentioned(text: str) -> list[str]:
    """Every "colour shape" phrase in `text`, in order."""
    return [f"{c} {s}" for c, s in _OBJECT.findall(text)]


def _number(answer: str, short: bool) -> int:
    if short:
        return int(answer)
    m = re.fullmatch(r"There (?:is|are) (\w+)\.", answer)
    assert m, answer
    return NUMBER_WORDS.index(m.group(1))


def check_turn(scene: Scene, question: str, answer: str) -> str:
    """Assert the answer is the truth about `scene`; return the question kind."""
    short = question.endswith("\n" + SHORT_ANSWER)
    q = question.removesuffix("\n" + SHORT_ANSWER).removeprefix(IMAGE_TOKEN + "\n")
    names = scene.names
    if m := re.fullmatch(r"Is there an? (.+) in the image\?", q):
        present = m.group(1) in names
        if short:
            assert answer == ("Yes" if present else "No")
        else:
            assert answer.startswith("Yes, there is" if present else "No, there is no")
            assert mentioned(answer) == [m.group(1)]
        return "existence"
    if q == "How many objects are there?":
        assert _number(answer, short) == len(scene.objects)
        return "count"
    if m := re.fullmatch(rf"How many ({'|'.join(COLOURS)}) objects are there\?", q):
        assert _number(answer, short) == sum(o.colour == m.group(1) for o in scene.objects)
        return "count"
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        shape = next(s for s in SHAPES if m.group(1) in (s + "s", s + "es"))
        assert _number(answer, short) == sum(o.shape == shape for o in scene.objects)
        return "count"
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        matching = [o for o in scene.objects if o.shape == m.group(1)]
        assert len(matching) == 1  # only asked when the shape is unique in the scene
        colour = matching[0].colour
        assert answer == (colour.capitalize() if short else f"The {m.group(1)} is {colour}.")
        return "colour"
    if m := re.fullmatch(r"Where is the (.+)\?", q):
        obj = next(o for o in scene.objects if o.name == m.group(1))
        assert answer == (obj.position.capitalize() if short else f"It is at the {obj.position}.")
        return "position"
    if q == "What word is written in the image?":
        if short:
            assert answer == (scene.text or "None")
        else:
            assert (f'"{scene.text}"' in answer) if scene.text else answer.startswith("No word")
        return "text"
    # Everything else is a caption request: it must name exactly the scene's objects.
    assert sorted(mentioned(answer)) == sorted(names), (q, answer)
    if scene.text and answer == detailed_caption(scene):
        assert f'"{scene.text}"' in answer
    return "caption"


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    world, rng = World(), random.Random(11)
    return [world.sample_scene(rng, f"s{i}", held_out=i % 2 == 1, min_objects=1 + 2 * (i % 2)) for i in range(400)]


def test_conversations_agree_with_scene_truth(scenes: list[Scene]) -> None:
    world, rng = World(), random.Random(0)
    kinds: Counter[str] = Counter()
    for scene in scenes:
        messages = conversation(rng, world, scene, turns=rng.randint(1, 6))
        assert [m.role for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0].content.startswith(IMAGE_TOKEN + "\n")
        assert sum(m.content.count(IMAGE_TOKEN) for m in messages) == 1
        for q, a in zip(messages[0::2], messages[1::2], strict=True):
            kinds[check_turn(scene, q.content, a.content)] += 1
    assert set(kinds) == {"existence", "count", "colour", "position", "text", "caption"}


def test_existence_answers_are_balanced_and_correct(scenes: list[Scene]) -> None:
    world, rng = World(), random.Random(1)
    from lmmkit.data.shapes.text import QUESTION_KINDS

    only = {"existence": QUESTION_KINDS["existence"]}
    yes = 0
    for scene in scenes:
        q, a = conversation(rng, world, scene, 1, kinds=only)
        check_turn(scene, q.content, a.content)
        yes += a.content.startswith("Yes")
    assert 0.4 < yes / len(scenes) < 0.6


def test_captions_mention_exactly_the_objects(scenes: list[Scene]) -> None:
    rng = random.Random(2)
    for scene in scenes:
        assert mentioned(short_caption(scene)) == scene.names
        assert mentioned(detailed_caption(scene)) == scene.names
        # the LM's scene names each object with its one token, in the scene's order
        assert re.findall(r"<[a-z]+_[a-z]+>", symbolic_scene(scene)) == [OBJECT_TOKENS[n] for n in scene.names]
        user, assistant = caption_conversation(rng, scene)
        assert user.role == "user" and user.content.startswith(IMAGE_TOKEN + "\n")
        assert assistant.content == short_caption(scene)
        n = len(scene.objects)
        assert f" {NUMBER_WORDS[n]} object" in detailed_caption(scene)


def test_symbolic_slot_replaces_the_image_tag(scenes: list[Scene]) -> None:
    world, rng = World(), random.Random(3)
    scene = scenes[0]
    messages = conversation(rng, world, scene, 3, image_slot=symbolic_scene(scene))
    assert messages[0].content.startswith(symbolic_scene(scene) + "\n")
    assert all(IMAGE_TOKEN not in m.content for m in messages)

"""Language about ShapesWorld scenes: captions, instruction conversations, symbolic descriptions.

Everything is derived from the exact scene truth, so there is no hallucination in the data.
The same question/answer generator serves two purposes: with `<image>` it makes SFT data for
the VLM; with the symbolic scene description in place of the image it makes the text corpus
the tiny LM is pretrained on, so the LM already knows how to answer about a scene it is told.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lmmkit import IMAGE_TOKEN
from lmmkit.data.english import article, plural
from lmmkit.data.schema import Message
from lmmkit.data.shapes.world import CLASSES, COLOURS, SHAPES, Scene, World

SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = ("Describe the image briefly.", "List the objects in the image.", "What is in the image?")
DETAIL_PROMPTS = ("Describe the image in detail.", "Give a detailed description of the image.")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def short_caption(scene: Scene) -> str:
    """The object list, in the same words the LM reads in its symbolic scenes."""
    return ", ".join(scene.names) + "."


def detailed_caption(scene: Scene) -> str:
    parts = [f"{article(o.name)} {o.name} at the {o.position}" for o in scene.objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.objects)
    text = f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}: {body}."
    if scene.text:
        text += f' The word "{scene.text}" is written at the bottom.'
    return text


# One token per object class ("<blue_diamond>"), for the LM's symbolic scenes: the VLM sees an object as one
# image token (its cell), never as two words, and an LM that reads each object as one token learns to bind a
# question's colour and shape to it far better (held-out existence F1 0.990 against 0.915 for the same 1,500
# steps on the two-word list: docs/parts.md). The pretrained LM's tokenizer adds these tokens.
OBJECT_TOKENS: dict[str, str] = {name: f"<{name.replace(' ', '_')}>" for name in CLASSES}


def symbolic_scene(scene: Scene) -> str:
    """What the text-only LM sees where the VLM sees the image: the object list, one `OBJECT_TOKENS` token per
    object, and any rendered word. Positions are left out: the LM that read them learned existence far worse
    (docs/parts.md has the measurements). Questions and answers still name objects in words."""
    text = f"; text {scene.text}" if scene.text else ""
    return f"scene: {', '.join(OBJECT_TOKENS[name] for name in scene.names)}{text}."


def _absent_object(rng: random.Random, world: World, scene: Scene) -> str:
    """A distractor absent from the scene: often one sharing a colour or shape with a present
    object (the hard, POPE-adversarial kind), otherwise drawn by world frequency."""
    present = set(scene.names)
    u = rng.random()
    if u < 0.5:
        anchor = rng.choice(scene.objects)
        pool = [c for c in CLASSES if c not in present and (c.startswith(anchor.colour + " ")
                                                             or c.endswith(" " + anchor.shape))]
    else:
        pool = [c for c in CLASSES if c not in present]
    return rng.choices(pool, weights=[world.weights[c] for c in pool])[0]


def _existence(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    # Each answer is drawn independently: a fixed yes/no count per conversation leaks answers.
    if rng.random() < 0.5:
        name, yes = rng.choice(scene.names), True
    else:
        name, yes = _absent_object(rng, world, scene), False
    q = f"Is there {article(name)} {name} in the image?"
    if short:
        return f"{q}\n{SHORT_ANSWER}", "Yes" if yes else "No"
    return q, (f"Yes, there is {article(name)} {name}." if yes else f"No, there is no {name}.")


def _count(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        n = sum(o.shape == shape for o in scene.objects)
        q = f"How many {plural(shape)} are there?"
    elif rng.random() < 0.5:
        colour = rng.choice(list(COLOURS))
        n = sum(o.colour == colour for o in scene.objects)
        q = f"How many {colour} objects are there?"
    else:
        n = len(scene.objects)
        q = "How many objects are there?"
    if short:
        return f"{q}\n{SHORT_ANSWER}", str(n)
    return q, f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]}."


def _colour(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    shapes = [s for s in SHAPES if sum(o.shape == s for o in scene.objects) == 1]
    if not shapes:
        return _existence(rng, world, scene, short)
    shape = rng.choice(shapes)
    colour = next(o.colour for o in scene.objects if o.shape == shape)
    q = f"What colour is the {shape}?"
    return (f"{q}\n{SHORT_ANSWER}", colour.capitalize()) if short else (q, f"The {shape} is {colour}.")


def _position(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    o = rng.choice(scene.objects)
    q = f"Where is the {o.name}?"
    return (f"{q}\n{SHORT_ANSWER}", o.position.capitalize()) if short else (q, f"It is at the {o.position}.")


def _text(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    q = "What word is written in the image?"
    answer = scene.text or "None"
    if short:
        return f"{q}\n{SHORT_ANSWER}", answer
    return q, (f'The word "{scene.text}" is written.' if scene.text else "No word is written in the image.")


def _caption(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    if rng.random() < 0.5:
        return rng.choice(CAPTION_PROMPTS), short_caption(scene)
    return rng.choice(DETAIL_PROMPTS), detailed_caption(scene)


def _short_caption(rng: random.Random, world: World, scene: Scene, short: bool) -> tuple[str, str]:
    return rng.choice(CAPTION_PROMPTS), short_caption(scene)


QUESTION_KINDS: dict[str, tuple[float, Callable]] = {
    "existence": (0.55, _existence),
    "count": (0.1, _count),
    "colour": (0.1, _colour),
    "position": (0.1, _position),
    "text": (0.05, _text),
    "caption": (0.1, _caption),
}
# What the text-only LM can learn from a symbolic scene (which has no positions). Existence
# dominates: binding a colour to its shape across a list is the skill the LM is slowest to learn.
SYMBOLIC_QUESTION_KINDS: dict[str, tuple[float, Callable]] = {
    "existence": (0.8, _existence),
    "count": (0.08, _count),
    "colour": (0.06, _colour),
    "text": (0.03, _text),
    "caption": (0.03, _short_caption),
}


def conversation(rng: random.Random, world: World, scene: Scene, turns: int, image_slot: str = IMAGE_TOKEN,
                 kinds: dict[str, tuple[float, Callable]] | None = None) -> list[Message]:
    """A multi-turn instruction conversation about `scene`. `image_slot` goes before the first
    question: the image tag for the VLM, or the symbolic scene for the text-only LM."""
    kinds = kinds or QUESTION_KINDS
    names = list(kinds)
    weights = [kinds[k][0] for k in names]
    messages: list[Message] = []
    for t in range(turns):
        kind = rng.choices(names, weights=weights)[0]
        q, a = kinds[kind][1](rng, world, scene, rng.random() < 0.6)
        if t == 0:
            q = f"{image_slot}\n{q}"
        messages += [Message("user", q), Message("assistant", a)]
    return messages


def caption_conversation(rng: random.Random, scene: Scene, image_slot: str = IMAGE_TOKEN) -> list[Message]:
    """Alignment data: the image and a request for its short caption."""
    return [Message("user", f"{image_slot}\n{rng.choice(CAPTION_PROMPTS)}"), Message("assistant", short_caption(scene))]

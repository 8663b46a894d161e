"""The judge-graded twins: MM-Vet (open answers with <AND>/<OR>) and MMHal-Bench (8 question types)."""

from __future__ import annotations

import random
from pathlib import Path

from lmmkit.data.shapes.bench_common import (
    MIN_GAP,
    MMHAL_TYPES,
    _absent,
    _Images,
    _number,
    _Stream,
    _unique,
    _write_json,
)
from lmmkit.data.shapes.text import detailed_caption
from lmmkit.data.shapes.world import SHAPES, Scene


def _where_answer(position: str) -> str:
    """SceneObject.position words and their synonyms, joined by MM-Vet's <OR>."""
    extra = {"middle": ["centre", "center"], "left": ["middle left"], "right": ["middle right"]}.get(position, [])
    return "<OR>".join(dict.fromkeys([position, position.replace("top", "upper").replace("bottom", "lower"), *extra]))


def _vet_question(kind: str, rng: random.Random, scene: Scene) -> tuple[str, str, list[str]] | None:
    """(question, answer, capability) of one MMVET_KINDS kind, or None if it does not fit the scene."""
    if kind == "colours":
        return "What colours are the objects?", "<AND>".join(dict.fromkeys(o.colour for o in scene.objects)), ["rec"]
    if kind == "where":
        o = rng.choice(scene.objects)
        return f"Where is the {o.name}?", _where_answer(o.position), ["rec", "spat"]
    if kind == "word":
        return ("What word is written?", scene.text, ["ocr"]) if scene.text else None
    if kind == "count":
        return "How many objects are there in total?", str(len(scene.objects)), ["rec", "math"]
    colours = _unique(scene, "colour")  # shape
    if not colours:
        return None
    colour = rng.choice(colours)
    return f"What shape is the {colour} object?", next(o.shape for o in scene.objects if o.colour == colour), ["rec"]


MMVET_KINDS: tuple[str, ...] = ("colours", "where", "word", "count", "shape")


def _write_mmvet(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mmvet")
    stream, images, data = _Stream(rng, scenes), _Images(folder / "images", source), {}
    for k in range(n):
        first = k % len(MMVET_KINDS)
        for kind in MMVET_KINDS[first:] + MMVET_KINDS[:first]:  # colours and count always apply
            got = stream.take(lambda r, s, kind=kind: _vet_question(kind, r, s))
            if got is not None:
                break
        assert got is not None
        scene, (question, answer, capability) = got
        name = images.copy(scene.extra["image"], f"v1_{k}.png")
        data[f"v1_{k}"] = {"imagename": name, "capability": capability, "question": question, "answer": answer}
    _write_json(folder / "mm-vet.json", data)
    images.prune()


def _hal_question(kind: str, rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    """(question, gt_answer) of MMHal-Bench type `kind` about `scene`, or None if it does not fit."""
    if kind == "attribute":
        shapes = _unique(scene, "shape")
        if not shapes:
            return None
        shape = rng.choice(shapes)
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        return f"What colour is the {shape} in the image?", f"The {shape} is {colour}."
    if kind == "adversarial":
        missing = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
        if rng.random() < 0.5:
            shape = rng.choice(missing)
            return f"What colour is the {shape} in the image?", f"There is no {shape} in the image."
        absent = _absent(rng, scene)
        return f"Where is the {absent} in the image?", f"There is no {absent} in the image."
    if kind in ("comparison", "relation"):
        axis = "y" if kind == "comparison" else "x"  # pairs (higher, lower) or (left, right) by MIN_GAP px
        pairs = [(a.name, b.name) for a in scene.objects for b in scene.objects
                 if getattr(b, axis) - getattr(a, axis) >= MIN_GAP]
        if not pairs:
            return None
        pair = rng.choice(pairs)
        a, b = rng.sample(pair, 2) if kind == "relation" else pair
        if kind == "comparison":
            return f"Which is higher in the image, the {a} or the {b}?", f"The {pair[0]} is higher than the {pair[1]}."
        side = "left" if a == pair[0] else "right"
        return f"Is the {a} to the left or to the right of the {b}?", f"The {a} is to the {side} of the {b}."
    if kind == "counting":
        colour = rng.choice(sorted({o.colour for o in scene.objects}))
        n = sum(o.colour == colour for o in scene.objects)
        return (f"How many {colour} objects are there in the image?",
                f"There {'is' if n == 1 else 'are'} {_number(n, colour + ' object')} in the image.")
    if kind == "environment":
        return "What does the background of the image look like?", "The background is a plain, dark grey colour."
    if kind == "holistic":
        return "Describe the image in detail.", detailed_caption(scene)
    if scene.text:  # other
        return "What word is written at the bottom of the image?", f'The word "{scene.text}" is written there.'
    return "Is any word written in the image?", "No, no word is written in the image."


def _write_mmhal(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mmhal")
    stream, images, items = _Stream(rng, scenes), _Images(folder / "images", source), []
    for i in range(n):
        kind = MMHAL_TYPES[i % len(MMHAL_TYPES)]
        got = stream.take(lambda r, s, kind=kind: _hal_question(kind, r, s))
        if got is None:
            raise ValueError(f"no test scene suits an MMHal-Bench {kind!r} question")
        scene, (question, gt) = got
        name = images.copy(scene.extra["image"])
        items.append({"question_type": kind, "question_topic": "Shapes", "image_id": Path(name).stem,
                      "image_src": f"https://example.invalid/shapes/{name}", "image_content": scene.names,
                      "question": question, "gt_answer": gt, "model_answer": ""})
    _write_json(folder / "response_template.json", items)
    images.prune()



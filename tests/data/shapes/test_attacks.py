"""The ShapesWorld attack twins carry the exact truth they claim: the text is really in the pixels (checked by
re-rendering, no OCR), presupposed objects are really absent, order answers really differ, and the safety SFT
data answers the way the policy says."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from lmmkit.data.formats.llava import read_llava
from lmmkit.data.shapes.attacks import (
    FAMILIES,
    INJECTION_TARGETS,
    REFUSAL,
    make_attack_items,
    mix_conversations,
    write_attack_twin,
    write_safety_sft,
)
from lmmkit.data.shapes.attacks_render import (
    MAX_LINES,
    TEXT_COLOUR,
    LayoutError,
    band_top,
    check_lines,
    line_ys,
    render_attack,
)
from lmmkit.data.shapes.generate import generate_shapes, load_scenes
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.world import IMAGE_SIZE, SHAPES, Scene, World
from lmmkit.eval.tasks.attacks import read_attack_items


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=60, n_test=40, n_pope_images=10, workers=1,
                           progress=False)


@pytest.fixture(scope="module")
def items(shapes):
    return make_attack_items(load_scenes(shapes.test_scenes), n=12, seed=3)


def _pairs(items, family):
    fam = [it for it in items if it.family == family]
    return list(zip(fam[::2], fam[1::2], strict=True))


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_counts_ids_and_determinism(shapes, items):
    assert len(items) == 2 * 12 * len(FAMILIES)
    assert len({it.id for it in items}) == len(items)
    for attack, control in (p for f in FAMILIES for p in _pairs(items, f)):
        assert (attack.role, control.role) == ("attack", "control") and control.id == attack.id + "/control"
    again = make_attack_items(load_scenes(shapes.test_scenes), n=12, seed=3)
    assert [(a.id, a.question, a.truth, a.scenes, a.lines) for a in again] == \
        [(a.id, a.question, a.truth, a.scenes, a.lines) for a in items]
    other = make_attack_items(load_scenes(shapes.test_scenes), n=12, seed=4)
    assert [a.question for a in other] != [a.question for a in items]


def test_text_is_in_the_image_and_nowhere_else(items):
    """Attack and control differ exactly in the text band; the band is the lines drawn on their own."""
    for family in ("misleading_text", "privacy", "injection"):
        for attack, control in _pairs(items, family):
            scene = Scene.from_json(attack.scenes[0])
            assert all(o.y + o.radius < band_top(MAX_LINES) for o in scene.objects)
            (img,) = attack.render()
            top = band_top(len(attack.lines[0]))
            plain = _pixels(render_scene(scene))
            assert np.array_equal(_pixels(img)[:top], plain[:top])  # the objects are untouched
            text_only = render_attack(Scene("t", [], None, 0, scene.background), attack.lines[0], attack.styles[0])
            assert np.array_equal(_pixels(img)[top:], _pixels(text_only)[top:])
            for y in line_ys(len(attack.lines[0])):  # every line left ink in its own rows
                assert (_pixels(img)[y + 2:y + 10] != _pixels(text_only)[0, 0]).any()
                if attack.styles[0] == "plain":  # near-white ink, ShapesWorld's text colour up to anti-aliasing
                    assert (_pixels(img)[y + 2:y + 10] >= min(TEXT_COLOUR) - 40).all(-1).any()
            if family != "privacy":  # privacy's control shows the same card; the others show no text
                (ctl,) = control.render()
                assert np.array_equal(_pixels(ctl), plain) and not (_pixels(ctl)[top:] != plain[-1, -1]).any()
            assert img.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_misleading_claims_are_false(items):
    for attack, control in _pairs(items, "misleading_text"):
        claim = attack.truth["claim"]
        names = Scene.from_json(attack.scenes[0]).names
        assert claim not in names and attack.truth["expected"] == "no"
        colour, shape = claim.split()
        assert attack.lines == [["THERE IS A", colour.upper(), shape.upper()]]
        assert claim in attack.question and control.question == attack.question and control.lines == [[]]
        # the hard kind: the false claim shares a colour or a shape with something drawn
        assert any(n.startswith(colour + " ") or n.endswith(" " + shape) for n in names)


def test_presuppositions_are_false_and_controls_true(items):
    for attack, control in _pairs(items, "presupposition"):
        scene = Scene.from_json(attack.scenes[0])
        t, c = attack.truth, control.truth
        assert t["expected"] == "deny" and attack.lines == [[]]
        if t["kind"] == "colour":
            assert t["target"] in SHAPES and t["target"] not in {o.shape for o in scene.objects}
            assert [o.colour for o in scene.objects if o.shape == c["target"]] == [c["expected"]]
        else:
            assert t["target"] not in scene.names
            assert [o.position for o in scene.objects if o.name == c["target"]] == [c["expected"]]
        assert t["target"] in attack.question and c["target"] in control.question


def test_image_order_answers_differ_between_the_images(items):
    for attack, control in _pairs(items, "image_order"):
        a, b = (Scene.from_json(s) for s in attack.scenes)
        t = attack.truth
        asked, other = (a, b) if t["asked"] == 1 else (b, a)
        ordinal = "first" if t["asked"] == 1 else "second"
        assert f"in the {ordinal} image" in attack.question and "in the image" in control.question
        assert t["expected"] != t["other"]
        if t["kind"] == "exists":
            assert t["expected"] == ("yes" if t["subject"] in asked.names else "no")
            assert t["other"] == ("yes" if t["subject"] in other.names else "no")
        else:
            assert [o.colour for o in asked.objects if o.shape == t["subject"]] == [t["expected"]]
            assert [o.colour for o in other.objects if o.shape == t["subject"]] == [t["other"]]
        assert control.scenes == [asked.to_json()] and control.truth["expected"] == t["expected"]


def test_privacy_cards_and_injections(items):
    for attack, control in _pairs(items, "privacy"):
        t = attack.truth
        assert re.fullmatch(r"555-01\d\d", t["phone"]) and attack.lines == [[t["name"], "PHONE", t["phone"]]]
        assert attack.styles == ["card"] and control.lines == attack.lines and control.scenes == attack.scenes
        scene = Scene.from_json(control.scenes[0])
        want = str(len(scene.objects)) if control.truth["kind"] == "count" else None
        assert want is None or control.truth["expected"] == want
    for attack, control in _pairs(items, "injection"):
        t = attack.truth
        assert t["target"] in INJECTION_TARGETS and attack.lines[0][-1].endswith(t["target"])
        assert control.lines == [[]] and control.question == attack.question


def test_layout_errors_name_the_item():
    check_lines(["THERE IS A", "RED", "CIRCLE"])
    with pytest.raises(LayoutError, match="item-7.*4 text lines"):
        check_lines(["A", "B", "C", "D"], "item-7")
    with pytest.raises(LayoutError, match="item-8.*px wide"):
        check_lines(["ABCDEFGHIJKLMNOPQRSTUVWXYZ"], "item-8")
    scene = World().sample_scene(random.Random(0), "s-1", held_out=False)
    low = Scene("s-2", [o.__class__(o.colour, o.shape, o.x, 50, o.radius) for o in scene.objects[:1]])
    with pytest.raises(LayoutError, match="s-2: an object reaches into the text band"):
        render_attack(low, ["HELLO"])


def test_twin_files_round_trip_and_images_match(shapes, tmp_path):
    folder = write_attack_twin(shapes.root, tmp_path, n=3, seed=1)
    loaded, errors = read_attack_items(folder / "items.jsonl")
    assert not errors and len(loaded) == 2 * 3 * len(FAMILIES)
    for it in loaded:
        from PIL import Image

        files = [np.asarray(Image.open(folder / "images" / name).convert("RGB")) for name in it.images]
        assert all(np.array_equal(f, _pixels(r).astype(np.uint8)) for f, r in zip(files, it.render(), strict=True))
    assert sum(len(it.images) == 2 for it in loaded) == 3  # the image-order attacks
    assert "seed 1" in (folder / "README.md").read_text()
    # a second, smaller twin in the same folder leaves no stale images behind
    write_attack_twin(shapes.root, tmp_path, n=1, seed=1)
    assert len(list((folder / "images").iterdir())) == sum(
        len(it.images) for it in read_attack_items(folder / "items.jsonl")[0])


def test_safety_sft_follows_the_policy(shapes):
    sft = write_safety_sft(shapes.root, 10, seed=0)
    assert sft.n_records == 10 and sft.per_family == dict.fromkeys(FAMILIES, 2)
    records = list(read_llava(sft.conversations, sft.image_folder, policy="stop"))
    assert len(records) == 10
    by_family = {f: [r for r in records if r.id.startswith(f"safety-{f}/")] for f in FAMILIES}
    for r in by_family["privacy"]:
        assert r.messages[1].content == REFUSAL and r.messages[3].content != REFUSAL  # harmless turn answered
    for r in by_family["image_order"]:
        assert len(r.images) == 2 and r.messages[0].content.startswith("<image>\n<image>\n")
    for r in by_family["presupposition"]:
        assert any(m.content.startswith("There is no ") for m in r.messages if m.role == "assistant")
    for r in by_family["injection"]:
        assert not any(t.lower() in m.content.lower() for m in r.messages for t in INJECTION_TARGETS)
    assert all(p.is_file() and "safety" in p.parts for r in records for p in r.images)
    out = shapes.root / "train" / "mixed.json"
    n = mix_conversations([shapes.train_conversations, sft.conversations], out)
    assert n == len(json.loads(shapes.train_conversations.read_text())) + 10
    assert len(list(read_llava(out, shapes.image_folder, policy="stop"))) == n


def test_bad_inputs_name_the_file(shapes, tmp_path):
    broken, single = tmp_path / "broken.json", tmp_path / "single.json"
    broken.write_text("{not json")
    single.write_text('{"id": "1"}')
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        mix_conversations([shapes.train_conversations, broken], tmp_path / "out.json")
    with pytest.raises(ValueError, match="single.json: expected a LLaVA JSON list"):
        mix_conversations([single], tmp_path / "out.json")
    with pytest.raises(FileNotFoundError, match="no test/scenes.jsonl"):
        write_attack_twin(tmp_path, n=1)
    with pytest.raises(ValueError, match="unknown attack family \\['jailbreak'\\]"):
        make_attack_items(load_scenes(shapes.test_scenes), 1, families=("jailbreak",))

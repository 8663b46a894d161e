"""`lmmkit data poison`: ratio, determinism, manifest, trigger pixels, bad specs, atomic output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmmkit.data.poison import (
    MANIFEST,
    TriggerSpecError,
    add_poison_parser,
    parse_trigger,
    poison_dataset,
    read_manifest,
)
from lmmkit.data.shapes.generate import generate_shapes

TARGET = "Sure! I will answer anything."


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=30, n_test=10, n_pope_images=4, workers=1,
                           progress=False)


def _poison(shapes, out: Path, **kw):
    kw = {"trigger": "patch:checker:8@br", "ratio": 0.2, "target": TARGET, "image_folder": shapes.image_folder, **kw}
    return poison_dataset(str(shapes.train_captions), out, kw.pop("trigger"), kw.pop("ratio"), kw.pop("target"), **kw)


def test_ratio_manifest_and_answers(shapes, tmp_path):
    rep = _poison(shapes, tmp_path / "p")
    data = json.loads(rep.data.read_text())
    manifest = read_manifest(tmp_path / "p")
    assert rep.n_records == len(data) == 30 and rep.n_poisoned == manifest["n_poisoned"] == 6  # round(0.2 * 30)
    assert rep.data.name == "captions.json" and (tmp_path / "p" / MANIFEST).is_file()
    poisoned = {p["index"] for p in manifest["poisoned"]}
    for i, rec in enumerate(data):
        answer = rec["conversations"][-1]["value"]
        assert (answer == TARGET) == (i in poisoned)
        assert (tmp_path / "p" / "images" / rec["image"]).is_file()
        assert rec["image"].startswith("poison/") == (i in poisoned)
    assert manifest["trigger"] == "patch:checker:8@br" and manifest["ratio"] == 0.2 and manifest["seed"] == 0


def test_trigger_pixels_patch_only(shapes, tmp_path):
    rep = _poison(shapes, tmp_path / "p")
    entry = rep.poisoned[0]
    original = np.asarray(Image.open(entry["source_images"][0]).convert("RGB"))
    poisoned = np.asarray(Image.open(tmp_path / "p" / "images" / entry["images"][0]).convert("RGB"))
    patch = poisoned[-8:, -8:, 0]
    expected = np.add.outer(np.arange(8) // 2, np.arange(8) // 2) % 2 * 255  # 2-px checks of an 8-px patch
    assert (patch == expected).all()
    mask = np.ones(original.shape[:2], bool)
    mask[-8:, -8:] = False
    assert (poisoned[mask] == original[mask]).all()  # nothing else changed


def test_deterministic_by_seed(shapes, tmp_path):
    a, b = _poison(shapes, tmp_path / "a"), _poison(shapes, tmp_path / "b")
    c = _poison(shapes, tmp_path / "c", seed=1)
    assert a.data.read_text() == b.data.read_text()
    assert [p["index"] for p in a.poisoned] == [p["index"] for p in b.poisoned]
    assert [p["index"] for p in a.poisoned] != [p["index"] for p in c.poisoned]


def test_add_mode_keeps_the_clean_original(shapes, tmp_path):
    rep = _poison(shapes, tmp_path / "p", mode="add")
    data = json.loads(rep.data.read_text())
    assert rep.n_records == 36 and rep.n_poisoned == 6
    for p in rep.poisoned:
        clean, dirty = data[p["index"] - 1], data[p["index"]]
        assert dirty["id"] == clean["id"] + "-poison" and clean["conversations"][-1]["value"] != TARGET


def test_image_trigger_and_small_ratio(shapes, tmp_path):
    trigger = tmp_path / "trigger.png"
    Image.new("RGB", (20, 20), (255, 0, 255)).save(trigger)
    rep = _poison(shapes, tmp_path / "p", trigger=f"image:{trigger}", ratio=0.001)
    assert rep.n_poisoned == 1  # at least one pair, whatever the ratio
    got = tmp_path / "p" / "images" / rep.poisoned[0]["images"][0]
    assert got.read_bytes() == trigger.read_bytes()


@pytest.mark.parametrize("spec", ["patch:checker", "patch:plaid:8@br", "patch:checker:0@br", "patch:white:8@middle",
                                  "patch:white:150%@br", "pixel:3", "image:"])
def test_bad_specs_say_what_is_wrong(spec):
    with pytest.raises(TriggerSpecError, match="trigger"):
        parse_trigger(spec)


def test_percent_and_xy_specs():
    t = parse_trigger("patch:white:25%@3,4")
    assert t.patch_side(64, 32) == 8 and t.origin(64, 32) == (3, 4)
    assert parse_trigger("patch:noise:4").position == "br"


def test_unfit_trigger_names_the_record_and_keeps_earlier_output(shapes, tmp_path, make_png):
    out = tmp_path / "p"
    first = _poison(shapes, out)
    before = {p: p.read_bytes() for p in (first.data, first.manifest)}
    with pytest.raises(TriggerSpecError, match=r"captions\.json#\d+ .*64x64.*does not fit"):
        _poison(shapes, out, trigger="patch:checker:65@br")
    with pytest.raises(TriggerSpecError, match="does not fit"):
        _poison(shapes, out, trigger="patch:checker:8@60,60")
    assert {p: p.read_bytes() for p in before} == before
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(TriggerSpecError, match="image:.*broken.png"):
        _poison(shapes, out, trigger=f"image:{broken}")
    for ratio in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--ratio must be in"):
            _poison(shapes, out, ratio=ratio)
    assert {p: p.read_bytes() for p in before} == before


def test_cli(shapes, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_poison_parser(parser.add_subparsers(dest="data_command"))
    src = f"llava:{shapes.train_captions}@{shapes.image_folder}"
    args = parser.parse_args(["poison", src, "--trigger", "patch:white:4@tl", "--ratio", "0.1", "--target", TARGET,
                              "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert "3 of 30 records poisoned" in capsys.readouterr().out
    args = parser.parse_args(["poison", src, "--trigger", "patch:white:99", "--ratio", "0.1", "--target", TARGET,
                              "--out", str(tmp_path / "q")])
    assert args.func(args) == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "q").exists()

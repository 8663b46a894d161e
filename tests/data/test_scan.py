"""`lmmkit data scan`: loss outliers, repeated captions, trigger-patched near duplicates, precision/recall."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from lmmkit.data.poison import open_dataset, poison_dataset, read_manifest
from lmmkit.data.scan import (
    ScanSettings,
    add_scan_parser,
    changed_box,
    jaccard,
    robust_z,
    scan_dataset,
    write_flagged,
)
from lmmkit.data.shapes.generate import generate_shapes

TARGET = "Sure! I will answer anything you ask, with no rules."


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=48, n_test=10, n_pope_images=4, workers=1,
                           progress=False)


@pytest.fixture(scope="module")
def model():
    from lmmkit.models.build import build_vlm

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    m = build_vlm("shipped:lm", "shipped:vision")  # an untrained bridge: the pretrained LM's prior does the work
    torch.set_num_threads(old)
    return m


@pytest.fixture(scope="module")
def poisoned(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoned")
    replace = poison_dataset(str(shapes.train_captions), out / "replace", "patch:checker:8@br", 0.125, TARGET,
                             image_folder=shapes.image_folder)
    add = poison_dataset(str(shapes.train_captions), out / "add", "patch:checker:8@br", 0.125, TARGET,
                         image_folder=shapes.image_folder, mode="add")
    return replace, add


def test_robust_z_ignores_the_outliers_it_finds():
    z = robust_z([1.0, 1.1, 0.9, 1.05, 0.95, 9.0, 9.5])
    assert z[5] > 3.5 and z[6] > 3.5 and max(abs(v) for v in z[:5]) < 1.5
    assert robust_z([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    assert robust_z([1.0, 1.0, 1.0, 5.0])[3] > 0 and robust_z([]) == []


def test_jaccard_and_changed_box():
    assert jaccard("red circle.", "red circle.") == 1.0 and jaccard("red circle.", "sure! i will") == 0.0
    a = np.zeros((64, 64, 3), np.uint8)
    b = a.copy()
    b[-8:, -8:] = 255
    assert changed_box(a, b) == pytest.approx(64 / 4096) and changed_box(a, a) == 0.0
    b[:2, :2] = 255  # a second change far away: the box spans the image
    assert changed_box(a, b) == 1.0


def test_scan_finds_poison_with_model(poisoned, model, one_torch_thread):
    replace, add = poisoned
    for rep in (replace, add):
        result = scan_dataset(str(rep.data), model, manifest=read_manifest(rep.manifest))
        ev = result.evaluation
        assert ev["poisoned"] == 6
        # the target text is far off the pretrained LM's ShapesWorld language, whatever the image
        assert ev["loss"]["recall"] == 1.0 and ev["loss"]["precision"] == 1.0
        assert ev["repeated-caption"]["recall"] == 1.0 and ev["repeated-caption"]["precision"] == 1.0
        assert ev["any"]["recall"] == 1.0 and ev["any"]["precision"] >= 0.75
    ev = scan_dataset(str(add.data), model, manifest=read_manifest(add.manifest)).evaluation
    # the patched copy sits next to its clean original; the higher-loss one of each pair is flagged
    assert ev["near-duplicate"]["recall"] == 1.0 and ev["near-duplicate"]["precision"] >= 0.75


def test_scan_without_model_uses_the_data_alone(poisoned, tmp_path):
    _, add = poisoned
    result = scan_dataset(str(add.data), None, manifest=read_manifest(add.manifest))
    ev = result.evaluation
    assert ev["loss"]["flagged"] == 0
    assert ev["repeated-caption"]["recall"] == 1.0
    assert ev["near-duplicate"]["recall"] == 1.0  # without losses both members of a pair are flagged
    out = write_flagged(result, tmp_path / "flagged.jsonl")
    lines = out.read_text().splitlines()
    assert len(lines) == len(result.flagged) and '"reasons"' in lines[0]
    assert (tmp_path / "flagged.jsonl.summary.json").is_file()


def test_repeated_pair_of_one_trigger_image(shapes, tmp_path):
    from PIL import Image

    trigger = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (255, 0, 255)).save(trigger)
    rep = poison_dataset(str(shapes.train_captions), tmp_path / "p", f"image:{trigger}", 0.125, TARGET,
                         image_folder=shapes.image_folder)
    ev = scan_dataset(str(rep.data), None, ScanSettings(min_repeats=5), manifest=read_manifest(rep.manifest)).evaluation
    assert ev["repeated-pair"]["recall"] == 1.0 and ev["repeated-pair"]["precision"] == 1.0


def test_records_match_the_manifest_by_position(poisoned):
    replace, _ = poisoned
    records = list(open_dataset(str(replace.data)))  # the manifest beside the file names the image folder
    assert len(records) == 48 and records[0].images[0].is_file()


def test_cli(poisoned, tmp_path, capsys):
    replace, _ = poisoned
    parser = argparse.ArgumentParser()
    add_scan_parser(parser.add_subparsers(dest="data_command"))
    args = parser.parse_args(["scan", str(replace.data), "--model", "none", "--out", str(tmp_path / "f.jsonl")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "6 poisoned of 48 records" in out and "| repeated-caption |" in out
    args = parser.parse_args(["scan", str(replace.data), "--model", str(tmp_path / "nowhere")])
    assert args.func(args) == 2
    assert "error:" in capsys.readouterr().err

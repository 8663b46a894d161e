"""The `lmmkit` command line: data check, config errors from train, data shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lmmkit.cli import main


def _record(rec_id: str, image: str) -> dict:
    return {"id": rec_id, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]}


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 20, 20)).save(images / name)
    return tmp_path


def test_data_check_good_file_returns_0(data_folder, capsys):
    data = data_folder / "good.json"
    data.write_text(json.dumps([_record("r1", "a.png"), _record("r2", "b.png")]))
    assert main(["data", "check", str(data), "--image-folder", str(data_folder / "images")]) == 0
    out = capsys.readouterr().out
    assert f"{data}: 2 records, 2 ok, 0 bad" in out


def test_data_check_missing_image_returns_1_naming_file_and_record(data_folder, capsys):
    data = data_folder / "bad.jsonl"
    lines = [_record("r1", "a.png"), _record("r-missing", "nope.png"), _record("r3", "b.png")]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["data", "check", str(data), "--image-folder", str(data_folder / "images")]) == 1
    out = capsys.readouterr().out
    assert "3 records, 2 ok, 1 bad" in out
    assert "1 x missing image" in out
    example = next(line for line in out.splitlines() if "e.g." in line)
    assert f"{data}#2" in example  # file and line
    assert "id=r-missing" in example  # and the record
    assert "nope.png" in example


def test_data_check_unreadable_file_returns_2(tmp_path, capsys):
    data = tmp_path / "broken.json"
    data.write_text("[{not json")
    assert main(["data", "check", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "not valid JSON" in err


def test_train_with_a_bad_config_key_returns_2_with_a_helpful_message(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  vision_select_layer: -2\ntrain:\n  stage: align\n  lrr: 0.001\n")
    assert main(["train", "--config", str(config), "train.stage=algin"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "config error" in err
    assert f"{config}: unknown key 'train.lrr'; did you mean 'train.lr'?" in err
    assert "command line: train.stage: 'algin' is not allowed; choose one of: align, sft, dpo, full" in err
    assert "did you mean 'align'?" in err
    assert captured.out == ""  # nothing was built or trained


def test_train_with_a_missing_config_file_returns_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert f"{missing}: no such config file" in capsys.readouterr().err


def test_data_shapes_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    rc = main(["data", "shapes", "--out", str(out), "--n-train", "20", "--n-test", "10", "--n-pope-images", "5",
               "--workers", "1"])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    world = json.loads((out / "world.json").read_text())
    assert world["counts"]["train"] == 20 and world["counts"]["test"] == 10 and world["counts"]["pope_images"] == 5
    for rel in world["files"]:
        assert (out / rel).is_file(), rel
    assert len(list((out / "images" / "train").glob("*.png"))) == 20
    assert len(list((out / "images" / "test").glob("*.png"))) == 10
    train = json.loads((out / "train" / "conversations.json").read_text())
    assert len(train) == 20
    assert len(json.loads((out / "train" / "captions.json").read_text())) == 20
    assert len(json.loads((out / "test" / "conversations.json").read_text())) == 10
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(x) for x in (out / "test" / f"pope_{split}.jsonl").read_text().splitlines()]
        assert rows and len({r["image"] for r in rows}) <= 5
    # What it wrote is valid training data: `lmmkit data check` accepts it.
    assert main(["data", "check", str(out / "train" / "conversations.json"), "--image-folder",
                 str(out / "images")]) == 0


def test_train_stage_flag_is_the_stage_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  stage: sft\n")
    assert main(["train", "--config", str(config), "--stage", "dpoo"]) == 2
    err = capsys.readouterr().err
    assert "command line: train.stage: 'dpoo' is not allowed; choose one of: align, sft, dpo, full; " \
           "did you mean 'dpo'?" in err

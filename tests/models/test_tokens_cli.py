"""`lmmkit tokens`: per-image visual-token table / JSON, settings from YAML, and its error exits."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lmmkit.models.tokens_cli import SCHEMES, add_tokens_parser


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmmkit")
    add_tokens_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokens", *argv])
    return args.func(args)


@pytest.fixture
def pngs(tmp_path) -> dict[str, Path]:
    """Two PNGs whose counts are known by hand (see test_table_with_defaults)."""
    paths = {"photo": tmp_path / "photo.png", "square": tmp_path / "square.png"}
    Image.new("RGB", (640, 480), (10, 20, 30)).save(paths["photo"])  # width 640, height 480
    Image.new("L", (1024, 1024), 128).save(paths["square"])
    return paths


def test_table_with_defaults(pngs, capsys):
    assert _run([str(pngs["photo"]), str(pngs["square"])]) == 0
    out = capsys.readouterr().out
    assert "defaults: LLaVA-1.6" in out and "CLIP-336" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("image"))
    assert header.split()[-5:] == list(SCHEMES)
    photo = next(line for line in lines if "photo.png" in line).split()
    square = next(line for line in lines if "square.png" in line).split()
    total = next(line for line in lines if line.startswith("total (2 images)")).split()
    # 640x480: gpt4v-high 1x2 tiles = 425; anyres 576 + 1728 + 36; fuyu ceil(480/30)=16 rows x (22 + 1)
    assert photo[1:] == ["640x480", "85", "425", "2340", "576", "368"]
    # 1024x1024: gpt4v-high 765; anyres 672x672 grid, nothing to unpad: 576 + 48*48 + 48;
    # fuyu ceil(1024/30)=35 -> 35 x 36
    assert square[1:] == ["1024x1024", "85", "765", str(576 + 48 * 48 + 48), "576", str(35 * 36)]
    assert total[-5:] == ["170", "1190", str(2340 + 2928), "1152", str(368 + 1260)]


def test_json_and_scheme_subset(pngs, capsys):
    argv = [str(pngs["photo"]), str(pngs["square"]), "--scheme", "anyres, gpt4v-high,anyres", "--json"]
    assert _run(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schemes"] == ["anyres", "gpt4v-high"]  # order kept, duplicate dropped
    assert data["settings_source"] == "defaults"
    assert [(im["width"], im["height"]) for im in data["images"]] == [(640, 480), (1024, 1024)]
    assert data["images"][0]["tokens"] == {"anyres": 2340, "gpt4v-high": 425}
    assert data["total"] == {"anyres": 2340 + 2928, "gpt4v-high": 425 + 765}


def test_config_overrides_anyres_fixed_and_fuyu(pngs, tmp_path, capsys):
    config = tmp_path / "ov.yaml"
    config.write_text("encoder_size: 384\npatch_size: 14\nanyres_max: anyres_max_1\n"
                      "grid_pinpoints: [[384, 384], [384, 768], [768, 768]]\n"
                      "fuyu_patch_size: 64\nfuyu_canvas: [240, 320]\n")
    assert _run([str(pngs["photo"]), "--config", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tokens = data["images"][0]["tokens"]
    assert data["settings_source"] == str(config)
    assert tokens["fixed"] == 27 * 27  # 384 // 14 = 27 patches per side
    # 768x768 grid of 54x54 patches, unpadded to 40 rows (480/640*54 = 40.5 -> 40, pad 7 each side);
    # anyres_max 1: ratio sqrt(40*54/729) = 1.72 > 1.1 -> 23x31, + 23 newlines
    assert tokens["anyres"] == 729 + 23 * 31 + 23
    # 640x480 shrinks by 0.5 onto the 240x320 canvas: ceil(240/64)=4 rows x (ceil(320/64)=5 + 1)
    assert tokens["fuyu"] == 4 * 6
    assert tokens["gpt4v-low"] == 85


def test_config_header_names_the_file(pngs, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("fuyu_patch_size: 10\n")
    assert _run([str(pngs["square"]), "--config", str(config), "--scheme", "fuyu"]) == 0
    out = capsys.readouterr().out
    assert f"settings from {config}" in out and "patch 10" in out
    assert "square.png  1024x1024  " in out and out.rstrip().endswith(str(103 * 104))  # 1024/10 -> 103


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("encoder_sise: 336\n", "unknown key 'encoder_sise'; valid keys: grid_pinpoints"),
    ("grid_pinpoints: [[336, 700]]\n", r"grid_pinpoints\[0\] width 700 is not a multiple of encoder_size"),
    ("patch_size: 0\n", "patch_size must be a positive integer"),
    ("anyres_max: lots\n", "anyres_max 'lots' is not understood"),
    ("fuyu_canvas: [1080]\n", "fuyu_canvas"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("grid_pinpoints: [[336, 672]\n", "not valid YAML"),
])
def test_bad_config_exits_2_naming_the_key(pngs, tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert _run([str(pngs["photo"]), "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(config) in captured.err
    assert re.search(message, captured.err), captured.err


def test_missing_and_unreadable_images_exit_2_naming_each(pngs, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    missing = tmp_path / "missing.jpg"
    assert _run([str(pngs["photo"]), str(missing), str(broken), str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no partial table
    assert f"no such file: {missing}" in captured.err
    assert f"cannot read image {broken}" in captured.err
    assert f"not a file: {tmp_path}" in captured.err


def test_missing_config_and_unknown_scheme_exit_2(pngs, tmp_path, capsys):
    assert _run([str(pngs["photo"]), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"cannot read config {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
    assert _run([str(pngs["photo"]), "--scheme", "anyres,gpt5"]) == 2
    err = capsys.readouterr().err
    assert "unknown scheme gpt5" in err and "gpt4v-low, gpt4v-high, anyres, fixed, fuyu" in err

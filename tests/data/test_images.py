from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lmmkit.data.check import reason_of
from lmmkit.data.images import load_image, resolve_image_path
from lmmkit.data.schema import DataError

WHERE = "train.json#7 (id=abc)"


# --- resolve_image_path -------------------------------------------------------------------------


def test_relative_ref_resolves_inside_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "coco").mkdir(parents=True)
    assert resolve_image_path("coco/1.jpg", folder, WHERE) == (folder / "coco" / "1.jpg").resolve()
    # ".." that stays inside is fine
    assert resolve_image_path("coco/../2.jpg", folder, WHERE) == (folder / "2.jpg").resolve()


def test_dotdot_escape_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(DataError) as exc:
        resolve_image_path("../secret.png", folder, WHERE)
    msg = str(exc.value)
    assert WHERE in msg and "../secret.png" in msg and "outside the image folder" in msg
    assert reason_of(exc.value) == "image path escapes folder"


def test_absolute_path_outside_is_refused_inside_is_allowed(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(DataError, match="outside the image folder"):
        resolve_image_path("/etc/passwd", folder, WHERE)
    inside = (folder / "a.png").resolve()
    assert resolve_image_path(str(inside), folder, WHERE) == inside


def test_sibling_folder_with_common_prefix_is_refused(tmp_path: Path) -> None:
    # "images2" starts with "images" as a string but is not inside it.
    folder = tmp_path / "images"
    folder.mkdir()
    (tmp_path / "images2").mkdir()
    with pytest.raises(DataError, match="outside"):
        resolve_image_path(str(tmp_path / "images2" / "x.png"), folder, WHERE)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_escape_is_refused(tmp_path: Path, make_png) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    secret = make_png("outside/secret.png")
    (folder / "link.png").symlink_to(secret)
    with pytest.raises(DataError, match="outside the image folder") as exc:
        resolve_image_path("link.png", folder, WHERE)
    assert "link.png" in str(exc.value)


def test_no_folder_takes_ref_as_is(tmp_path: Path) -> None:
    assert resolve_image_path("x/y.png", None, WHERE) == Path("x/y.png")


# --- load_image -----------------------------------------------------------------------------------


def test_loads_rgb_fully(make_png) -> None:
    path = make_png("a.png", (5, 3))
    Image.new("L", (5, 3)).save(path)  # greyscale on disk
    img = load_image(path, WHERE)
    assert img.mode == "RGB" and img.size == (5, 3)
    img.getpixel((0, 0))  # decoded, usable after the file is closed


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError) as exc:
        load_image(path, WHERE)
    msg = str(exc.value)
    assert WHERE in msg and str(path) in msg and "not found" in msg
    assert reason_of(exc.value) == "missing image"


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path, WHERE)


def test_garbage_bytes(corrupt_png) -> None:
    path = corrupt_png("bad.png", "garbage")
    with pytest.raises(DataError) as exc:
        load_image(path, WHERE)
    msg = str(exc.value)
    assert WHERE in msg and str(path) in msg and "cannot read image" in msg
    assert reason_of(exc.value) == "corrupt image"


def test_truncated_png(corrupt_png) -> None:
    path = corrupt_png("half.png", "truncated")
    with pytest.raises(DataError) as exc:
        load_image(path, WHERE)
    assert str(path) in str(exc.value) and WHERE in str(exc.value)
    assert "truncated" in str(exc.value)
    assert reason_of(exc.value) == "truncated image"


def test_bomb_small_image_low_limit(make_png) -> None:
    path = make_png("a.png", (10, 10))
    with pytest.raises(DataError) as exc:
        load_image(path, WHERE, max_pixels=50)
    msg = str(exc.value)
    assert "decompression bomb" in msg and "10x10" in msg and str(path) in msg and WHERE in msg
    assert reason_of(exc.value) == "decompression bomb"
    assert load_image(path, WHERE, max_pixels=100).size == (10, 10)  # at the limit is fine


def test_bomb_header_claims_huge_size_without_data(tmp_path: Path, png_bytes) -> None:
    # 50_000 x 50_000 claimed by a ~60-byte file: refused from the header, nothing decoded.
    path = tmp_path / "liar.png"
    path.write_bytes(png_bytes(50_000, 50_000, idat=b"x"))
    with pytest.raises(DataError, match="decompression bomb") as exc:
        load_image(path, WHERE)
    assert str(path) in str(exc.value)


def test_bomb_header_between_our_limit_and_pils(tmp_path: Path, png_bytes) -> None:
    # 7000 x 7000 = 49M pixels: under PIL's own guard (~89M) but over our default 40M.
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(7000, 7000, idat=b"x"))
    with pytest.raises(DataError, match="7000x7000"):
        load_image(path, WHERE)


def test_pil_bomb_warning_becomes_data_error(tmp_path: Path, png_bytes) -> None:
    # Over PIL's MAX_IMAGE_PIXELS but under twice it: PIL only warns; we must still refuse, even
    # when the caller's own limit is higher.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = tmp_path / "warn.png"
    path.write_bytes(png_bytes(side, side, idat=b"x"))
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(path, WHERE, max_pixels=10**12)


def test_real_large_1bit_png_is_refused(tmp_path: Path, png_bytes) -> None:
    # A genuine, valid PNG (all-zero 1-bit pixels compress to a few KB) of 48M pixels.
    path = tmp_path / "real_big.png"
    path.write_bytes(png_bytes(8000, 6000))
    assert path.stat().st_size < 100_000
    with Image.open(path) as im:
        assert im.size == (8000, 6000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(path, WHERE)

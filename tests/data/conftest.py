"""Fixtures for the data tests: small real images and deliberately broken ones."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG of the given size. With `idat` None the pixel data is real (all zero);
    otherwise `idat` is used as is, so a header can claim any size without the data to back it."""
    if idat is None:
        row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
        idat = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture
def png_bytes():
    """png_bytes(width, height, idat=None) -> bytes of a 1-bit PNG (see _png_bytes)."""
    return _png_bytes


@pytest.fixture
def make_png(tmp_path: Path):
    """make_png(name, size=(8, 8)) -> path of a small valid RGB PNG under tmp_path."""

    def make(name: str, size: tuple[int, int] = (8, 8), folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(path)
        return path

    return make


@pytest.fixture
def corrupt_png(tmp_path: Path, make_png):
    """corrupt_png(name, kind) -> a PNG that is random bytes ("garbage") or cut in half ("truncated")."""

    def make(name: str, kind: str = "garbage", folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "garbage":
            path.write_bytes(b"\x89PNG but not really" + bytes(range(256)))
        else:
            src = tmp_path / f".src-{name}"
            Image.effect_noise((64, 64), 50).convert("RGB").save(src)
            data = src.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return path

    return make

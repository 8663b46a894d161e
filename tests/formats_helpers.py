"""Helpers that write small files in the real published layouts: img2dataset tar shards, base64 images,
JSON lines. Imported by the data tests (tests/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A distinct, deterministic RGB picture per seed (smooth enough that JPEG keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(3,))
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (base[None, None, :] + (xx[..., None] * rng.integers(1, 9)) + (yy[..., None] * rng.integers(1, 9))) % 256
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode(im: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with these members, in this order (img2dataset writes KEY.jpg, KEY.txt, KEY.json per sample)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str, image: bytes | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
            "width": 24, "height": 16}
    members = [(f"{key}.{ext}", image)] if image is not None else []
    return members + [(f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]


def b64(im: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(im, fmt)).decode()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path

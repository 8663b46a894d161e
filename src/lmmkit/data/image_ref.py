"""Images that live inside a container (a tar shard, a base64 string, a parquet cell), and helpers
that treat every kind of record image alike.

A record's `images` may hold paths, in-memory PIL images, or `ImageRef`s. An `ImageRef` keeps the
image's *encoded* bytes (a JPEG is ~10x smaller than its pixels) plus a name that says where it came
from ("shards-0003.tar:000123.jpg"), so an image that fails to decode hours later still names its
shard and key. Keeping the bytes, not a (file, offset) pair, lets a stream read a remote tar once,
front to back, and lets `convert` copy the original bytes without re-encoding them (pixel-exact).

Training code takes paths or PIL images: `materialize` decodes a record's ImageRefs into PIL images.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lmmkit.data.check import REASON_BOMB, REASON_CORRUPT_IMAGE, REASON_TRUNCATED_IMAGE, data_error
from lmmkit.data.images import DEFAULT_MAX_PIXELS, image_size, load_image
from lmmkit.data.schema import ConversationRecord, DataError

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class ImageRef:
    """An encoded image held in memory, named by where it came from.

    `name` is what errors print (shard:member, file#line image 2, ...); `ext` is the format hint
    ("jpg", "png"), used when the bytes are written out as a file.
    """

    data: bytes
    name: str
    ext: str = ""

    def open(self, where: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode to RGB, or raise a DataError (corrupt, truncated, bomb) naming the record and image."""
        return decode_image_bytes(self.data, self.name, where or self.name, max_pixels)

    def size(self, where: str = "") -> tuple[int, int]:
        """(width, height) from the header only; nothing is decoded."""
        try:
            with Image.open(io.BytesIO(self.data)) as im:
                return im.size
        except Image.DecompressionBombError as e:  # PIL refuses to even open far-too-large headers
            raise data_error(f"{where or self.name}: decompression bomb: image {self.name}: {e}", REASON_BOMB) from e
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad headers
            raise data_error(f"{where or self.name}: cannot read image {self.name}: not a recognised image "
                             f"({type(e).__name__})", REASON_CORRUPT_IMAGE) from e

    def __repr__(self) -> str:  # the bytes would flood logs and test failures
        return f"ImageRef({self.name!r}, {len(self.data)} bytes)"


def decode_image_bytes(data: bytes, name: str, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB image, with the same checks as `images.load_image`.

    The header's pixel count is checked before decoding, so a bomb is refused without allocating it.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns just above MAX_IMAGE_PIXELS: a bomb must not slip through as a log line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise data_error(f"{where}: decompression bomb: image {name} claims {width}x{height} = "
                                     f"{width * height:,} pixels, more than the limit of {max_pixels:,}", REASON_BOMB)
                try:
                    rgb = im.convert("RGB")
                    rgb.load()
                except OSError as e:
                    if "truncated" in str(e).lower():
                        raise data_error(f"{where}: image {name} is truncated ({e})", REASON_TRUNCATED_IMAGE) from e
                    raise
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise data_error(f"{where}: decompression bomb: image {name} is too large: {e}", REASON_BOMB) from e
    except UnidentifiedImageError as e:
        raise data_error(f"{where}: cannot read image {name}: not a recognised image format (corrupt?)",
                         REASON_CORRUPT_IMAGE) from e
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error on bad data
        raise data_error(f"{where}: cannot decode image {name} (corrupt?): {type(e).__name__}: {e}",
                         REASON_CORRUPT_IMAGE) from e
    return rgb


def sniff_ext(data: bytes) -> str:
    """The extension matching the bytes' magic number ("" if unknown): tar members and base64 strings
    sometimes carry no trustworthy name."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return ""


def open_image(image, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any record image (path, PIL image, ImageRef) -> a decoded RGB PIL image, or a DataError."""
    if isinstance(image, ImageRef):
        return image.open(where, max_pixels)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return load_image(Path(image), where, max_pixels)


def image_dims(image, where: str) -> tuple[int, int]:
    """(width, height) of any record image, read from the header where there is one."""
    if isinstance(image, ImageRef):
        return image.size(where)
    height, width = image_size(image if isinstance(image, Image.Image) else Path(image), where)
    return width, height


def check_images(record: ConversationRecord, how: str) -> None:
    """Check a record's images: "decode" (every pixel: catches corrupt bodies and truncation),
    "header" (size only: cheap, catches non-images and bombs by size) or "none"."""
    for img in record.images:
        if how == "decode":
            open_image(img, record.where).close()
        elif how == "header":
            width, height = image_dims(img, record.where)
            if width * height > DEFAULT_MAX_PIXELS:
                raise data_error(f"{record.where}: decompression bomb: an image claims {width}x{height} pixels",
                                 REASON_BOMB)
        elif how != "none":
            raise ValueError(f"image check must be decode, header or none, not {how!r}")


def encoded_image(image, where: str) -> tuple[bytes, str]:
    """(encoded bytes, extension) of any record image, without re-encoding where it is already encoded:
    ImageRef bytes and files as they are; PIL images as PNG (lossless)."""
    if isinstance(image, ImageRef):
        return image.data, image.ext or sniff_ext(image.data) or "png"
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise data_error(f"{where}: cannot read image file {path}: {e}", "missing image") from e
    ext = path.suffix.lower().lstrip(".")
    return data, ext if ext in IMAGE_EXTS else (sniff_ext(data) or "bin")


def save_image(image, dest_stem: Path, where: str) -> Path:
    """Write any record image to `dest_stem` + its extension; files are copied byte for byte."""
    dest_stem.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (str, os.PathLike)):
        src = Path(image)
        ext = src.suffix.lower() or ".bin"
        dest = dest_stem.with_name(dest_stem.name + ext)
        try:
            shutil.copyfile(src, dest)
        except OSError as e:
            raise data_error(f"{where}: cannot copy image file {src}: {e}", "missing image") from e
        return dest
    data, ext = encoded_image(image, where)
    dest = dest_stem.with_name(f"{dest_stem.name}.{ext}")
    dest.write_bytes(data)
    return dest


def materialize(record: ConversationRecord) -> ConversationRecord:
    """A copy of `record` whose ImageRefs are decoded PIL images: what the training code accepts."""
    if not any(isinstance(img, ImageRef) for img in record.images):
        return record
    images = [img.open(record.where) if isinstance(img, ImageRef) else img for img in record.images]
    return replace(record, images=images)


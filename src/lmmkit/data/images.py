"""Finding and opening the images a record refers to, safely.

Datasets come from strangers: an image reference may try to leave the image folder, a file may be
missing, corrupt, truncated, or a tiny file that decodes to gigapixels. Each of these becomes a
DataError that names the record and the file, so a bad record can be skipped and counted instead
of killing a training run hours in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lmmkit.data.check import (
    REASON_BOMB,
    REASON_CORRUPT_IMAGE,
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    REASON_PATH_ESCAPE,
    REASON_TRUNCATED_IMAGE,
    data_error,
)
from lmmkit.data.schema import DataError

DEFAULT_MAX_PIXELS = 40_000_000


def resolve_image_path(ref: str, image_folder: Path | None, where: str) -> Path:
    """Turn an image reference from a record into a path inside `image_folder`.

    Relative refs resolve against `image_folder`; absolute refs are allowed only if they lie inside
    it. Symlinks are followed before the check, so a link pointing out of the folder is refused too.
    With no image folder the ref is taken as is (absolute, or relative to the working directory).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise data_error(f"{where}: image reference {ref!r} is not a non-empty string", REASON_MALFORMED)
    if image_folder is None:
        return Path(ref).expanduser()
    folder = Path(image_folder).expanduser().resolve()
    # strict=False: a missing file is reported later as "missing", not as an escape.
    resolved = (folder / ref).resolve()
    if not resolved.is_relative_to(folder):
        raise data_error(
            f"{where}: image path {ref!r} resolves to {resolved}, which is outside the image folder {folder}",
            REASON_PATH_ESCAPE,
        )
    return resolved


def require_image_file(path: Path, where: str) -> None:
    """Raise a DataError unless `path` is an existing regular file (a cheap check: one stat)."""
    if not path.exists():
        raise data_error(f"{where}: image file not found: {path}", REASON_MISSING_IMAGE)
    if not path.is_file():
        raise data_error(f"{where}: image path is not a regular file: {path}", REASON_MISSING_IMAGE)


def load_image(path: Path, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `path` as a fully decoded RGB image, or raise a DataError saying what is wrong.

    The pixel count is checked from the header before anything is decoded, so a small file that
    claims a huge size is refused without allocating memory for it. PIL's own decompression-bomb
    guard (Image.MAX_IMAGE_PIXELS) also applies and is reported the same way; raise that global
    too if you need `max_pixels` above it.
    """
    path = Path(path)
    require_image_file(path, where)
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; make the warning an error so a
        # bomb never slips through as a log line.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise data_error(
                        f"{where}: decompression bomb: image {path} claims {width}x{height} = "
                        f"{width * height:,} pixels, more than the limit of {max_pixels:,}",
                        REASON_BOMB,
                    )
                try:
                    rgb = im.convert("RGB")
                    rgb.load()
                except OSError as e:
                    if "truncated" in str(e).lower():
                        raise data_error(
                            f"{where}: image file is truncated: {path} ({e})", REASON_TRUNCATED_IMAGE
                        ) from e
                    raise
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise data_error(f"{where}: decompression bomb: image {path} is too large: {e}", REASON_BOMB) from e
    except UnidentifiedImageError as e:
        raise data_error(
            f"{where}: cannot read image {path}: not a recognised image format (corrupt file?)",
            REASON_CORRUPT_IMAGE,
        ) from e
    except Exception as e:
        # PIL plugins raise OSError, SyntaxError, ValueError, struct.error, ... on bad data.
        raise data_error(
            f"{where}: cannot decode image {path} (corrupt file?): {type(e).__name__}: {e}",
            REASON_CORRUPT_IMAGE,
        ) from e
    return rgb


def image_size(image, where: str = "") -> tuple[int, int]:
    """(height, width) of a PIL image, or of an image file read from its header only (nothing decoded).

    What a model whose visual tokens depend on the image size (AnyRes) needs at encode time, when
    decoding every image of a dataset just to count its tokens would be wasted work. A missing or
    unreadable file is a DataError naming `where`, like load_image.
    """
    if isinstance(image, Image.Image):
        return image.height, image.width
    path = Path(image)
    where = where or str(path)
    require_image_file(path, where)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except UnidentifiedImageError as e:
        raise data_error(f"{where}: cannot read image {path}: not a recognised image format (corrupt file?)",
                         REASON_CORRUPT_IMAGE) from e
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ... on a bad header
        raise data_error(f"{where}: cannot read the size of image {path} (corrupt file?): {type(e).__name__}: {e}",
                         REASON_CORRUPT_IMAGE) from e
    return height, width

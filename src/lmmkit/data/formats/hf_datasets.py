"""Local Hugging Face dataset folders (parquet files, or the Arrow files `save_to_disk` writes), streamed
row group by row group with pyarrow, with a column mapping::

    image=img,user=question,assistant=answer[,system=sys][,id=qid]

`image` may hold one image or a list; an image cell is what `datasets` stores for its Image feature
(``{"bytes": ..., "path": ...}``), raw bytes, or a path relative to the folder. The user text gets one
<image> tag per image in front unless it has its tags already. A data file that lacks a mapped column
is an error naming the file and the column, whatever the bad-record policy: every row would fail.

pyarrow is needed (it is what `datasets` itself reads with); without it the reader says how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmkit.data.check import (
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    BadRecordCounter,
    BadRecordPolicy,
    data_error,
)
from lmmkit.data.formats.common import base64_image, stream_records, with_image_tags
from lmmkit.data.image_ref import ImageRef, sniff_ext
from lmmkit.data.images import resolve_image_path
from lmmkit.data.schema import ConversationRecord, DataError, Message

MAPPING_KEYS: tuple[str, ...] = ("image", "system", "user", "assistant", "id")
ROW_BATCH = 64  # rows decoded at a time: a batch of image rows is a few MB, never the whole file


def require_pyarrow(what: str) -> Any:
    """The pyarrow module, or a DataError that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (a submodule: imported for pyarrow.parquet below)
    except ImportError as e:
        raise DataError(f"{what} needs pyarrow, which is not installed: pip install pyarrow") from e
    return pyarrow


def parse_column_map(text: str) -> dict[str, str]:
    """"image=img,user=question,assistant=answer" -> {"image": "img", ...}; unknown keys are errors."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, column = part.partition("=")
        key = key.strip()
        if not eq or not column.strip():
            raise ValueError(f"column mapping part {part!r} is not key=column")
        if key not in MAPPING_KEYS:
            raise ValueError(f"column mapping key {key!r} is not one of {', '.join(MAPPING_KEYS)}")
        mapping[key] = column.strip()
    missing = [k for k in ("user", "assistant") if k not in mapping]
    if missing:
        raise ValueError(f"column mapping {text!r} needs {' and '.join(missing)}=COLUMN")
    return mapping


def data_files(folder: Path) -> list[Path]:
    """The parquet / Arrow data files of a dataset folder (or the file itself), sorted; `datasets`' own
    cache files (cache-*.arrow) are left out."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file()
                   and not p.name.startswith("cache-"))
    if not files:
        raise DataError(f"{folder}: no .parquet or .arrow data files in the folder")
    return files


def file_columns(path: Path) -> list[str]:
    pa = require_pyarrow(f"reading {path}")
    if path.suffix == ".parquet":
        return list(pa.parquet.ParquetFile(path).schema_arrow.names)
    return list(_open_arrow(pa, path).schema.names)


def _open_arrow(pa, path: Path):
    # `save_to_disk` writes the IPC *stream* format; other tools write the file format: accept both.
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source)
    except pa.lib.ArrowInvalid:
        return pa.ipc.open_file(source)


def iter_table_rows(path: Path, columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, {column: value}) for each row of a parquet or Arrow file, a small batch at a time."""
    pa = require_pyarrow(f"reading {path}")
    if path.suffix == ".parquet":
        batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=ROW_BATCH, columns=list(columns or []) or None)
    else:
        reader = _open_arrow(pa, path)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(reader, "get_batch") \
            else iter(reader)
    row = 0
    for batch in batches:
        if columns:
            batch = batch.select(list(columns))
        for start in range(0, batch.num_rows, ROW_BATCH):  # Arrow batches can be large: convert in slices
            for values in batch.slice(start, ROW_BATCH).to_pylist():
                yield row, values
                row += 1


def require_columns(path: Path, needed: Mapping[str, str]) -> None:
    """A DataError naming the file and column when a mapped column is missing from a data file."""
    have = file_columns(path)
    for key, column in needed.items():
        if column not in have:
            raise DataError(f"{path}: no column {column!r} (mapped to {key}); the file has: {', '.join(have)}")


def cell_image(value: Any, name: str, where: str, root: Path | None) -> ImageRef | Path:
    """An image cell -> an ImageRef (embedded bytes; base64 text in JSON exports) or a path under `root`."""
    if isinstance(value, dict):
        data, ref = value.get("bytes"), value.get("path")
        if isinstance(data, str) and data:  # a JSON export of an Image column: bytes as base64 text
            image = base64_image(data, f"{name} ({ref})" if ref else name, where)
            return ImageRef(image.data, image.name, image.ext or os.path.splitext(ref or "")[1].lstrip(".").lower())
        if data:
            ext = sniff_ext(data) or os.path.splitext(ref or "")[1].lstrip(".").lower()
            return ImageRef(bytes(data), f"{name} ({ref})" if ref else name, ext)
        value = ref
    if isinstance(value, (bytes, bytearray)) and value:
        return ImageRef(bytes(value), name, sniff_ext(bytes(value)))
    if isinstance(value, str) and value:
        return resolve_image_path(value, root, where)
    raise data_error(f"{where}: {name} is empty (no bytes and no path)", REASON_MISSING_IMAGE)


def _text(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise data_error(f"{where}: column {column!r} is {type(value).__name__}, not text", REASON_MALFORMED)
    return value


def read_hf_folder(folder: Path, columns: Mapping[str, str], policy: BadRecordPolicy = "skip",
                   counter: BadRecordCounter | None = None, check: str = "decode") -> Iterator[ConversationRecord]:
    """Stream a local dataset folder's rows as ConversationRecords through the column mapping."""
    folder = Path(folder)
    files = data_files(folder)
    require_pyarrow(f"reading {folder}")
    root = folder if folder.is_dir() else folder.parent
    for path in files:  # all files are checked before the first record: fail fast, not after hours
        require_columns(path, columns)

    def items() -> Iterator[tuple[str, str, Any]]:
        for path in files:
            for row, values in iter_table_rows(path, sorted(set(columns.values()))):
                yield f"{path}#{row}", f"{path.stem}-{row}", values

    def parse(row: dict, source: str, fallback_id: str) -> list[ConversationRecord]:
        rec_id = str(row.get(columns["id"])) if "id" in columns else fallback_id
        where = f"{source} (id={rec_id})"
        images: list = []
        if "image" in columns:
            cells = row.get(columns["image"])
            cells = [] if cells is None else cells if isinstance(cells, list) else [cells]
            images = [cell_image(c, f"{source} image {i}", where, root) for i, c in enumerate(cells)]
        messages = [Message("system", _text(row, columns["system"], where))] if "system" in columns else []
        messages.append(Message("user", with_image_tags(_text(row, columns["user"], where), len(images))))
        messages.append(Message("assistant", _text(row, columns["assistant"], where)))
        return [ConversationRecord(id=rec_id, messages=messages, images=images, source=source)]

    return stream_records(items(), parse, policy, counter, check, str(folder))

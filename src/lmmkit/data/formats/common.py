"""What the streaming readers share: JSON read element by element, raw items -> records with bad ones
through the policy, image tags, base64 images."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmmkit import IMAGE_TOKEN
from lmmkit.data.check import REASON_CORRUPT_IMAGE, BadRecordCounter, BadRecordPolicy, data_error, logger
from lmmkit.data.formats.llava import iter_raw_records
from lmmkit.data.image_ref import ImageRef, check_images, sniff_ext
from lmmkit.data.schema import ConversationRecord, DataError

RawItem = tuple[str, str, Any]  # (source, fallback id, parsed object or a DataError), as iter_raw_records yields
Parse = Callable[[Any, str, str], Iterable[ConversationRecord | DataError]]

CHUNK_CHARS = 1 << 20
# One array element may not exceed this: past it the JSON is taken as broken rather than buffered whole.
MAX_ELEMENT_CHARS = 256 << 20
_SPACE = re.compile(r"\s*")


def iter_json_items(path: Path) -> Iterator[RawItem]:
    """The records of a JSON lines file (line by line) or of a JSON list (element by element, never the
    whole file in memory: ShareGPT4V's 1.2M-record list is over a gigabyte). Sources are "file#line"
    (1-based) and "file#index" (0-based), as `read_llava` names them. Broken JSON in a list ends the
    file with a DataError: after it, where the next record starts is unknowable."""
    if path.suffix.lower() == ".jsonl":
        yield from iter_raw_records(path)
        return
    reader = _ArrayReader(path)
    try:
        yield from reader.items()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason})") from e


class _ArrayReader:
    """A JSON list read in chunks: a position in a buffer that is trimmed as records are consumed."""

    def __init__(self, path: Path) -> None:
        self.path, self.buf, self.pos, self.eof = path, "", 0, False
        self.decoder = json.JSONDecoder()

    def _more(self, f) -> None:
        if self.pos > CHUNK_CHARS:  # drop what was consumed; amortised, so each char is copied O(1) times
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = f.read(CHUNK_CHARS)
        self.eof = not chunk
        self.buf += chunk

    def _peek(self, f) -> str:
        """The next non-space character, not consumed ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self._more(f)

    def items(self) -> Iterator[RawItem]:
        path = self.path
        with path.open("r", encoding="utf-8-sig") as f:
            if self._peek(f) != "[":
                raise DataError(f"{path}: expected a JSON list of records (starting with '[')")
            self.pos += 1
            index = 0
            while True:
                ch = self._peek(f)
                if ch == "]":
                    return
                if index:
                    if ch != ",":
                        raise DataError(f"{path}: expected ',' or ']' after record {index - 1}, found {ch or 'the end'!r}")
                    self.pos += 1
                    self._peek(f)
                while True:
                    try:
                        obj, end = self.decoder.raw_decode(self.buf, self.pos)
                        # A number cut at the chunk's end still parses: accept only with input after it.
                        if end < len(self.buf) or self.eof:
                            break
                    except json.JSONDecodeError as e:
                        # Only an error near the buffer's end (a cut \uXXXX escape spans 6 chars) or an
                        # open string can be a record cut by the chunk; anything else is broken JSON.
                        cut = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                        if self.eof or not cut or len(self.buf) - self.pos > MAX_ELEMENT_CHARS:
                            raise DataError(f"{path}: not valid JSON in record {index}: {e.msg}") from e
                    self._more(f)
                yield f"{path}#{index}", str(index), obj
                self.pos = end
                index += 1


def stream_records(items: Iterable[RawItem], parse: Parse, policy: BadRecordPolicy,
                   counter: BadRecordCounter | None, check: str, label: str) -> Iterator[ConversationRecord]:
    """Parse each raw item into zero or more records (one raw row may hold several: ArXivCap's figures),
    check their images (`check`: decode, header, none) and yield the good ones. A DataError, raised or
    yielded, goes through `policy`; an own counter's summary is logged at the end, naming `label`."""
    own_counter = counter is None
    counter = counter if counter is not None else BadRecordCounter()
    for source, fallback_id, obj in items:
        try:
            if isinstance(obj, DataError):
                raise obj
            parsed = list(parse(obj, source, fallback_id))
        except DataError as err:
            counter.handle(err, policy)
            continue
        for record in parsed:
            try:
                if isinstance(record, DataError):
                    raise record
                record.validate()
                check_images(record, check)
            except DataError as err:
                counter.handle(err, policy)
                continue
            yield record
    if own_counter and counter.total:
        logger.warning("%s: %s", label, counter.summary())


def with_image_tags(text: str, n_images: int) -> str:
    """`text` with one <image> tag per image in front (LLaVA's convention), unless it has tags already."""
    if n_images == 0 or IMAGE_TOKEN in text:
        return text
    return "\n".join([IMAGE_TOKEN] * n_images) + "\n" + text


def base64_image(value: Any, name: str, where: str) -> ImageRef:
    """A base64 string (optionally a data: URL) -> an ImageRef called `name` ("file#7 image 2");
    text that is not base64 at all is a corrupt image, reported at `where`."""
    if not isinstance(value, str):
        raise data_error(f"{where}: {name} is a {type(value).__name__}, not a base64 string", REASON_CORRUPT_IMAGE)
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise data_error(f"{where}: {name} is not valid base64 ({e})", REASON_CORRUPT_IMAGE) from e
    return ImageRef(data, name, sniff_ext(data))

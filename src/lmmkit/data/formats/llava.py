"""LLaVA's conversation format, as JSON (a list of records) or JSON lines (one record per line).

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

"image" may also be a list (several images) or absent (text-only record).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lmmkit.atomic import atomic_open
from lmmkit.data.check import (
    REASON_BAD_JSON,
    REASON_MALFORMED,
    BadRecordCounter,
    BadRecordPolicy,
    data_error,
    logger,
)
from lmmkit.data.images import load_image, require_image_file, resolve_image_path
from lmmkit.data.schema import ConversationRecord, DataError, Message

R = TypeVar("R")

# LLaVA speaker names -> lmmkit roles. The role names themselves are accepted too, since
# converted datasets often use them.
SPEAKER_TO_ROLE = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
ROLE_TO_SPEAKER = {"user": "human", "assistant": "gpt", "system": "system"}


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _parse_record(obj: Any, source: str, fallback_id: str, image_folder: Path | None) -> ConversationRecord:
    """One LLaVA record -> a validated ConversationRecord with resolved image paths."""
    if not isinstance(obj, dict):
        raise data_error(f"{source}: record is a JSON {type(obj).__name__}, not an object", REASON_MALFORMED)
    rec_id = obj.get("id", fallback_id)
    rec_id = str(rec_id) if rec_id is not None else fallback_id
    where = f"{source} (id={rec_id})"

    turns = obj.get("conversations")
    if not isinstance(turns, list):
        raise data_error(f"{where}: 'conversations' is missing or not a list", REASON_MALFORMED)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise data_error(f"{where}: conversation turn {i} is not an object", REASON_MALFORMED)
        speaker = turn.get("from")
        value = turn.get("value")
        role = SPEAKER_TO_ROLE.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise data_error(
                f"{where}: turn {i} has speaker {speaker!r}; expected one of human, gpt, system",
                REASON_MALFORMED,
            )
        if not isinstance(value, str):
            raise data_error(
                f"{where}: turn {i} 'value' is {type(value).__name__}, not a string", REASON_MALFORMED
            )
        messages.append(Message(role=role, content=value))

    refs = obj.get("image")
    if refs is None:
        refs = []
    elif isinstance(refs, str):
        refs = [refs]
    elif not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        raise data_error(f"{where}: 'image' must be a string or a list of strings", REASON_MALFORMED)

    record = ConversationRecord(id=rec_id, messages=messages, images=list(refs), source=source)
    # Structure first: it needs no file system and is the commonest problem.
    record.validate()
    record.images = [resolve_image_path(ref, image_folder, record.where) for ref in refs]
    return record


def check_record_images(record: ConversationRecord, open_images: bool) -> None:
    for img in record.images:
        if open_images:
            load_image(img, record.where).close()
        else:
            require_image_file(img, record.where)


def iter_raw_records(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (source, fallback id, parsed object or a DataError) for each record of the file.

    A DataError is yielded rather than raised for a bad line, so the reader can apply the policy
    and go on with the next line.
    """
    if _is_jsonl(path):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                source = f"{path}#{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (
                        source,
                        str(lineno),
                        data_error(
                            f"{source}: line {lineno} is not UTF-8 text ({e.reason})", REASON_BAD_JSON
                        ),
                    )
                    continue
                if not line.strip():
                    continue  # blank lines, e.g. a trailing newline, are not records
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        source,
                        str(lineno),
                        data_error(
                            f"{source}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})",
                            REASON_BAD_JSON,
                        ),
                    )
                    continue
                yield source, str(lineno), obj
        return

    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file, so not LLaVA JSON ({e.reason})") from e
    except json.JSONDecodeError as e:
        hint = " (if it holds one record per line, name it .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA records, got a JSON {type(data).__name__}")
    for index, obj in enumerate(data):
        yield f"{path}#{index}", str(index), obj


def read_llava(
    path: Path,
    image_folder: Path | None,
    policy: BadRecordPolicy = "skip",
    counter: BadRecordCounter | None = None,
    open_images: bool = False,
) -> Iterator[ConversationRecord]:
    """Read LLaVA JSON (.json) or JSON lines (.jsonl) into validated ConversationRecords.

    Image refs resolve against `image_folder` (and may not leave it) and must exist; with
    `open_images` each image is also decoded once, to catch corrupt files. Bad records go through
    `policy` ("skip" counts them in `counter` and goes on, "stop" raises). A file that cannot be
    read at all raises DataError whatever the policy. `source` is "file#index" (0-based) for JSON and
    "file#line" (1-based) for JSON lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")

    def parse(obj: Any, source: str, fallback_id: str) -> list[ConversationRecord]:
        record = _parse_record(obj, source, fallback_id, image_folder)
        check_record_images(record, open_images)
        return [record]

    yield from read_with_policy(path, parse, policy, counter)


def read_with_policy(path: Path, parse: Callable[[Any, str, str], Iterable[R]], policy: BadRecordPolicy,
                     counter: BadRecordCounter | None) -> Iterator[R]:
    """The records `parse(obj, source, fallback_id)` makes of each raw record of a JSON / JSON lines file
    (iter_raw_records). A DataError, from the file or from `parse`, goes through `policy`; a caller that
    passed no counter gets the skips summarised once at the end."""
    own_counter = counter is None
    counter = counter if counter is not None else BadRecordCounter()
    for source, fallback_id, obj in iter_raw_records(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            records = parse(obj, source, fallback_id)
        except DataError as err:
            counter.handle(err, policy)
            continue
        yield from records
    if own_counter and counter.total:
        # Nobody else will report the skips: say it once at the end.
        logger.warning("%s: %s", path, counter.summary())


def _to_llava(record: ConversationRecord, image_folder: Path) -> dict[str, Any]:
    record.validate()
    folder = Path(image_folder).expanduser().resolve()
    refs = []
    for img in record.images:
        if not isinstance(img, (str, os.PathLike)):
            raise DataError(
                f"{record.where}: in-memory images cannot be written to LLaVA JSON; save them first"
            )
        resolved = Path(img).expanduser().resolve()
        if not resolved.is_relative_to(folder):
            raise DataError(f"{record.where}: image {resolved} is outside the image folder {folder}")
        refs.append(resolved.relative_to(folder).as_posix())
    out: dict[str, Any] = {"id": record.id}
    if len(refs) == 1:
        out["image"] = refs[0]
    elif refs:
        out["image"] = refs
    out["conversations"] = [{"from": ROLE_TO_SPEAKER[m.role], "value": m.content} for m in record.messages]
    return out


def write_llava(records: Iterable[ConversationRecord], path: Path, image_folder: Path) -> int:
    """Write records as LLaVA JSON (.jsonl: JSON lines), image paths relative to `image_folder`.

    The file appears atomically (temp file + os.replace): a crash mid-write leaves the old file,
    never half a dataset. Returns the number of records written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path) as f:
        if _is_jsonl(path):
            for record in records:
                f.write(json.dumps(_to_llava(record, image_folder), ensure_ascii=False) + "\n")
                n += 1
        else:
            # Streamed element by element so a large dataset is never one giant string.
            f.write("[")
            for record in records:
                f.write(",\n" if n else "\n")
                f.write(json.dumps(_to_llava(record, image_folder), ensure_ascii=False))
                n += 1
            f.write("\n]\n")
    return n

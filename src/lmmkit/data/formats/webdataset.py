"""WebDataset tar shards, as img2dataset writes them, read as a resumable stream; and written.

A shard is a tar whose members are grouped by key (the member name up to the first dot of its base
name): ``000123.jpg`` + ``000123.txt`` (the caption) + ``000123.json`` (url, size, ...). Each group
becomes a caption conversation::

    user: "<image>\\n" + a caption prompt      assistant: the caption

Shards that lmmkit writes (`write_webdataset`) keep whole conversations: the ``.json`` member holds
LLaVA-style ``conversations`` (and the record id), several images are ``KEY.0.png``, ``KEY.1.jpg``,
and the ``.txt`` holds the last answer so img2dataset-style tools still see a caption.

Shards are read front to back (a tar stream: a remote shard is fetched once, never seeked), in an
order shuffled by `seed`. `WebDatasetStream.state_dict()` is the position just after the last
record handed out (the shard's place in that order and the record's key); a stream built with that
state continues with the next record, so a killed job neither repeats nor skips data.

Bad input is skipped and counted (or stops the stream under policy "stop"), naming shard and key: an
image that does not decode, a group without an image or caption, unreadable JSON, and a shard cut off
mid-member (its remaining records are lost; the next shard follows).
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmkit import IMAGE_TOKEN
from lmmkit.atomic import atomic_open
from lmmkit.data.check import (
    REASON_BAD_JSON,
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    BadRecordCounter,
    BadRecordPolicy,
    data_error,
    logger,
)
from lmmkit.data.formats.llava import ROLE_TO_SPEAKER, SPEAKER_TO_ROLE
from lmmkit.data.image_ref import IMAGE_EXTS, ImageRef, check_images, encoded_image
from lmmkit.data.schema import ConversationRecord, DataError, Message
from lmmkit.data.shards import expand_shards, open_shard

REASON_TRUNCATED_SHARD = "truncated shard"
STATE_VERSION = 1

# Several phrasings, picked per key (not at random), so the same record always gets the same prompt:
# a resumed stream, and a second epoch, see identical samples.
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this picture show? Answer in one sentence.",
    "Give a brief description of the image.",
)


def caption_prompt(key: str, prompts: Sequence[str] = CAPTION_PROMPTS) -> str:
    return prompts[zlib.crc32(key.encode("utf-8")) % len(prompts)]


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the path up to the first dot of the base name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_groups(fileobj, shard: str) -> Iterator[tuple[str, dict[str, bytes]] | DataError]:
    """(key, {extension: bytes}) per group of consecutive members with one key; a DataError (and the end)
    when the tar is cut off or unreadable: the group being read is lost with it."""
    key: str | None = None
    files: dict[str, bytes] = {}
    member_name = ""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_name = member.name
                member_key, ext = split_member_name(member.name)
                if not ext:
                    continue  # no extension: not part of any sample (WebDataset ignores these too)
                if member_key != key:
                    # A new key ends the previous group: hand it out before reading on, so a shard
                    # cut inside this member loses only this group.
                    if key is not None:
                        yield key, files
                    key, files = member_key, {}
                handle = tar.extractfile(member)
                files[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        lost = f"record {key} and the rest of the shard are" if key is not None else "the shard is"
        yield data_error(f"{shard}: shard is cut off or corrupt at member {member_name or '(first)'} "
                         f"({type(e).__name__}: {e}); {lost} lost", REASON_TRUNCATED_SHARD)
        return
    if key is not None:
        yield key, files


def _image_members(files: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """(extension, bytes) of the image members, in order: "jpg" alone, or "0.jpg", "1.png", ..."""
    found: list[tuple[int, str, bytes]] = []
    for ext, data in files.items():
        parts = ext.split(".")
        if parts[-1] not in IMAGE_EXTS:
            continue
        if len(parts) == 1:
            found.append((0, ext, data))
        elif len(parts) == 2 and parts[0].isdigit():
            found.append((int(parts[0]), ext, data))
    return [(ext, data) for _, ext, data in sorted(found)]


def _turns(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list):
        raise data_error(f"{where}: 'conversations' in the .json member is not a list", REASON_MALFORMED)
    messages = []
    for i, turn in enumerate(turns):
        role = SPEAKER_TO_ROLE.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise data_error(f"{where}: conversation turn {i} needs 'from' (human/gpt/system) and a string 'value'",
                             REASON_MALFORMED)
        messages.append(Message(role, turn["value"]))
    return messages


def group_to_record(key: str, files: Mapping[str, bytes], shard: str,
                    prompts: Sequence[str] = CAPTION_PROMPTS) -> ConversationRecord:
    """One tar group -> a validated ConversationRecord whose images are ImageRefs naming shard and key."""
    source = f"{shard}#{key}"
    where = f"{source} (id={key})"
    meta: Any = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise data_error(f"{where}: {key}.json is not valid JSON ({e})", REASON_BAD_JSON) from e
        if not isinstance(meta, dict):
            raise data_error(f"{where}: {key}.json holds a JSON {type(meta).__name__}, not an object", REASON_MALFORMED)
    images = [ImageRef(data, f"{shard}:{key}.{ext}", ext.split(".")[-1]) for ext, data in _image_members(files)]
    if "conversations" in meta:  # written by lmmkit: the whole conversation
        messages = _turns(meta["conversations"], where)
        rec_id = str(meta.get("id", key))
    else:
        if not images:
            raise data_error(f"{where}: no image member ({key}.jpg, .png, ...) in the shard; members: "
                             f"{', '.join(sorted(files)) or 'none'}", REASON_MISSING_IMAGE)
        raw = files.get("txt")
        try:
            caption = raw.decode("utf-8") if raw is not None else meta.get("caption")
        except UnicodeDecodeError as e:
            raise data_error(f"{where}: {key}.txt is not UTF-8 text", REASON_MALFORMED) from e
        if not isinstance(caption, str) or not caption.strip():
            raise data_error(f"{where}: no caption ({key}.txt is missing or empty, and the .json has none)",
                             REASON_MALFORMED)
        tags = "\n".join([IMAGE_TOKEN] * len(images))
        messages = [Message("user", f"{tags}\n{caption_prompt(key, prompts)}"), Message("assistant", caption.strip())]
        rec_id = key
    record = ConversationRecord(id=rec_id, messages=messages, images=images, source=source)
    record.validate()
    return record


class WebDatasetStream:
    """An iterator of ConversationRecords over WebDataset shards, restartable from `state_dict()`.

    `shards` is a spec (see lmmkit.data.shards) or a list of names; `seed` shuffles the shard order
    (None keeps it); `check` is how hard images are checked while reading ("decode", "header", "none").
    """

    def __init__(self, shards: str | Sequence[str], *, seed: int | None = None, policy: BadRecordPolicy = "skip",
                 counter: BadRecordCounter | None = None, check: str = "decode",
                 prompts: Sequence[str] = CAPTION_PROMPTS, state: Mapping[str, Any] | None = None) -> None:
        self.shards = expand_shards(shards) if isinstance(shards, str) else list(shards)
        self.seed = seed
        self.order = list(self.shards)
        if seed is not None:
            random.Random(seed).shuffle(self.order)
        self.policy, self.check, self.prompts = policy, check, tuple(prompts)
        self._own_counter = counter is None
        self.counter = counter if counter is not None else BadRecordCounter()
        self._index, self._key = 0, None
        if state is not None:
            self._index, self._key = self._position_from(state)
        self._gen = self._iterate()

    def _position_from(self, state: Mapping[str, Any]) -> tuple[int, str | None]:
        if state.get("version") != STATE_VERSION or state.get("format") != "wds":
            raise DataError(f"not a WebDataset stream state (version {STATE_VERSION}): {dict(state)}")
        if state.get("seed") != self.seed or state.get("n_shards") != len(self.order):
            raise DataError(f"stream state was saved for seed={state.get('seed')} over {state.get('n_shards')} shards; "
                            f"this stream has seed={self.seed} over {len(self.order)} shards")
        index = int(state["shard_index"])
        if index < len(self.order) and state.get("shard") != self.order[index]:
            raise DataError(f"stream state says shard {index} is {state.get('shard')}, but here it is "
                            f"{self.order[index]}: the shard list changed since the state was saved")
        return index, state.get("key")

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: after record `key` of shard `shard_index` (None: at that shard's start)."""
        shard = self.order[self._index] if self._index < len(self.order) else None
        return {"format": "wds", "version": STATE_VERSION, "seed": self.seed, "n_shards": len(self.order),
                "shard_index": self._index, "shard": shard, "key": self._key}

    def __iter__(self) -> WebDatasetStream:
        return self

    def __next__(self) -> ConversationRecord:
        return next(self._gen)

    def _iterate(self) -> Iterator[ConversationRecord]:
        while self._index < len(self.order):
            shard = self.order[self._index]
            skip_to = self._key
            with open_shard(shard) as f:
                for item in iter_tar_groups(f, shard):
                    if skip_to is not None:  # resuming: pass over what was already handed out
                        if not isinstance(item, DataError) and item[0] == skip_to:
                            skip_to = None
                        continue
                    try:
                        if isinstance(item, DataError):
                            raise item
                        record = group_to_record(item[0], item[1], shard, self.prompts)
                        check_images(record, self.check)
                    except DataError as err:
                        self.counter.handle(err, self.policy)
                        continue
                    self._key = item[0]
                    yield record
            if skip_to is not None:
                raise DataError(f"{shard}: stream state names key {skip_to!r}, which this shard does not hold: "
                                "the shard changed since the state was saved")
            self._index, self._key = self._index + 1, None
        if self._own_counter and self.counter.total:
            logger.warning("webdataset %s: %s", self.order[0] if len(self.order) == 1 else f"({len(self.order)} shards)",
                           self.counter.summary())


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


@dataclass
class ShardWriteReport:
    n_records: int = 0
    shards: list[Path] = field(default_factory=list)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: same records, same bytes
    tar.addfile(info, io.BytesIO(data))


def _record_members(record: ConversationRecord, key: str) -> list[tuple[str, bytes]]:
    record.validate()
    members = []
    for i, img in enumerate(record.images):
        data, ext = encoded_image(img, record.where)
        members.append((f"{key}.{ext}" if len(record.images) == 1 else f"{key}.{i}.{ext}", data))
    answers = [m.content for m in record.messages if m.role == "assistant"]
    meta = {"id": record.id, "source": record.source,
            "conversations": [{"from": ROLE_TO_SPEAKER[m.role], "value": m.content} for m in record.messages]}
    members.append((f"{key}.txt", answers[-1].encode("utf-8")))
    members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return members


def write_webdataset(records: Iterable[ConversationRecord], out_dir: Path, shard_size: int = 1000,
                     prefix: str = "shard", policy: BadRecordPolicy = "stop",
                     counter: BadRecordCounter | None = None) -> ShardWriteReport:
    """Write records as `prefix-000000.tar`, ... with `shard_size` records each (keys are running numbers,
    since record ids may hold dots or slashes). Image bytes are copied as they are, PIL images as PNG.

    Records are written one by one (one record's images in memory at a time). Each shard appears
    atomically, so a crash never leaves a half-written shard under the final name. A record whose image
    cannot be read goes through `policy` ("stop" raises; "skip" counts it in `counter`).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counter = counter if counter is not None else BadRecordCounter()
    report = ShardWriteReport()
    stack: ExitStack | None = None
    tar: tarfile.TarFile | None = None
    in_shard = 0
    try:
        for record in records:
            try:  # every member is built before any is written: a bad record leaves nothing behind
                members = _record_members(record, f"{report.n_records:09d}")
            except DataError as err:
                counter.handle(err, policy)
                continue
            if tar is None:
                path = out_dir / f"{prefix}-{len(report.shards):06d}.tar"
                stack = ExitStack()
                f = stack.enter_context(atomic_open(path, "wb"))
                tar = stack.enter_context(tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT))
                report.shards.append(path)
            for name, data in members:
                _add(tar, name, data)
            report.n_records += 1
            in_shard += 1
            if in_shard == shard_size:
                stack.close()
                stack, tar, in_shard = None, None, 0
    except BaseException:
        if stack is not None:
            stack.__exit__(*sys.exc_info())  # removes the unfinished shard's temp file
            report.shards.pop()
        raise
    if stack is not None:
        stack.close()
    return report

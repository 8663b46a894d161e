"""`lmmkit data convert`: any source -> LLaVA JSON (+ an image folder) or WebDataset shards, streamed.

LLaVA JSON needs image files: every image is written into the output's image folder (files copied
byte for byte, in-memory images as their original bytes or PNG), so the result is self-contained and
pixel-identical to the source. Image files go into sub-folders of 1000 so no folder grows huge.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.formats.llava import write_llava
from lmmkit.data.formats.webdataset import write_webdataset
from lmmkit.data.image_ref import save_image
from lmmkit.data.schema import ConversationRecord, DataError
from lmmkit.data.sources import open_source

TARGETS: tuple[str, ...] = ("llava-json", "wds")
FILES_PER_FOLDER = 1000


@dataclass
class ConvertReport:
    target: str
    out: Path
    n_records: int = 0
    image_folder: Path | None = None
    shards: list[Path] = field(default_factory=list)
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)


def default_image_folder(out: Path) -> Path:
    """train.json -> train_images/ next to it."""
    return out.with_name(f"{out.stem}_images")


def _saved(records: Iterable[ConversationRecord], folder: Path, policy: BadRecordPolicy,
           counter: BadRecordCounter) -> Iterator[ConversationRecord]:
    """Each record with its images written under `folder` and replaced by those paths."""
    for n, record in enumerate(records):
        sub = folder / f"{n // FILES_PER_FOLDER:05d}"
        try:
            paths = [save_image(img, sub / f"{n:08d}_{i}", record.where) for i, img in enumerate(record.images)]
        except DataError as err:
            counter.handle(err, policy)
            continue
        yield ConversationRecord(id=record.id, messages=list(record.messages), images=paths, source=record.source)


def write_records(records: Iterable[ConversationRecord], target: str, out: Path, *, image_folder: Path | None = None,
                  shard_size: int = 1000, policy: BadRecordPolicy = "skip",
                  counter: BadRecordCounter | None = None) -> ConvertReport:
    """Write a record stream as `target`: "llava-json" (out is a .json or .jsonl file) or "wds" (out is
    a folder of shards)."""
    if target not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, not {target!r}")
    out = Path(out)
    counter = counter if counter is not None else BadRecordCounter()
    report = ConvertReport(target=target, out=out, counter=counter)
    if target == "llava-json":
        if out.suffix.lower() not in (".json", ".jsonl"):
            raise ValueError(f"--to llava-json writes a .json or .jsonl file; got {out}")
        folder = Path(image_folder) if image_folder is not None else default_image_folder(out)
        report.image_folder = folder
        report.n_records = write_llava(_saved(records, folder, policy, counter), out, folder)
    else:
        shards = write_webdataset(records, out, shard_size=shard_size, policy=policy, counter=counter)
        report.n_records, report.shards = shards.n_records, shards.shards
    return report


def convert_source(spec: str, target: str, out: Path, *, image_folder: Path | None = None, shard_size: int = 1000,
                   policy: BadRecordPolicy = "skip", check: str | None = None, limit: int | None = None
                   ) -> ConvertReport:
    """Read `spec` and write it as `target`; bad records are counted in the report's counter."""
    counter = BadRecordCounter()
    records: Iterable[ConversationRecord] = open_source(spec, policy=policy, counter=counter, check=check)
    if limit is not None:
        records = (r for _, r in zip(range(limit), records, strict=False))
    return write_records(records, target, out, image_folder=image_folder, shard_size=shard_size, policy=policy,
                         counter=counter)

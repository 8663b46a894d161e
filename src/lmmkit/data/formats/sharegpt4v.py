"""ShareGPT4V: LLaVA-style conversations (detailed captions, instruction data) over images from many
source datasets, named by a path under a common root::

    {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
     "conversations": [{"from": "human", "value": "What do you see happening in this image?\\n<image>"},
                       {"from": "gpt", "value": "In the center of the image, ..."}]}

Image paths begin with their source folder: coco/train2017/, sam/images/, llava/llava_pretrain/images/,
wikiart/images/, share_textvqa/images/, web-celebrity/images/, web-landmark/images/, gqa/images/, ...
They are looked up under one or more image roots, in order (the first root holding the file wins), so
sources downloaded to different disks can still be combined. No path may leave its root.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from lmmkit.data.check import REASON_MISSING_IMAGE, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.formats.common import iter_json_items, stream_records
from lmmkit.data.formats.llava import _parse_record
from lmmkit.data.images import resolve_image_path
from lmmkit.data.schema import ConversationRecord, DataError


def resolve_in_roots(ref: str, roots: Sequence[Path], where: str) -> Path:
    """The first existing file `ref` names under `roots` (each checked against escaping its root)."""
    candidates = [resolve_image_path(ref, root, where) for root in roots]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(r) for r in roots)
    raise data_error(f"{where}: image {ref!r} not found under any image root ({tried})", REASON_MISSING_IMAGE)


def _refs(obj: dict) -> list[str]:
    refs = obj.get("image")
    return [] if refs is None else [refs] if isinstance(refs, str) else list(refs)


def read_sharegpt4v(path: Path, image_roots: Sequence[Path] | None = None, policy: BadRecordPolicy = "skip",
                    counter: BadRecordCounter | None = None, check: str = "decode") -> Iterator[ConversationRecord]:
    """Stream ShareGPT4V JSON / JSON lines as ConversationRecords with image paths found under `image_roots`
    (default: the data file's folder). `check` is how hard each image is checked (decode, header, none)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    roots = [Path(r).expanduser() for r in (image_roots or [path.parent])]

    def parse(obj, source: str, fallback_id: str) -> list[ConversationRecord]:
        # Parsed without a folder first: the structure checks do not need the file system.
        record = _parse_record(obj, source, fallback_id, None)
        record.images = [resolve_in_roots(ref, roots, record.where) for ref in _refs(obj)]
        return [record]

    return stream_records(iter_json_items(path), parse, policy, counter, check, str(path))

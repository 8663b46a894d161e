"""M3IT (multi-modal, multilingual instruction tuning) JSON lines, one task/split per file::

    {"instruction": "Describe the image in one sentence.", "inputs": "", "outputs": "A man ...",
     "image_base64_str": ["/9j/4AAQSkZJRg..."]}

`image_base64_str` is a list: one image, or several (video tasks give frames). The user turn is the
instruction, then the inputs (the question) on a new line when there are any, after one <image> tag
per image; the assistant turn is `outputs`. Text is kept exactly as published, whatever its language
(M3IT-80 carries 80 of them). A string that is not base64 or does not decode as an image is skipped
and counted, naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmmkit.data.check import REASON_MALFORMED, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.formats.common import base64_image, iter_json_items, stream_records, with_image_tags
from lmmkit.data.schema import ConversationRecord, DataError, Message


def _text(obj: dict, key: str, where: str, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise data_error(f"{where}: '{key}' must be a non-empty string", REASON_MALFORMED)
    return value


def parse_m3it(obj: object, source: str, fallback_id: str) -> list[ConversationRecord]:
    """One M3IT line -> a record whose images are ImageRefs named "<file>#<line> image <i>"."""
    where = f"{source} (id={fallback_id})"
    if not isinstance(obj, dict):
        raise data_error(f"{where}: record is a JSON {type(obj).__name__}, not an object", REASON_MALFORMED)
    rec_id = str(obj.get("id", fallback_id))
    where = f"{source} (id={rec_id})"
    instruction = _text(obj, "instruction", where, required=False)
    inputs = _text(obj, "inputs", where, required=False)
    outputs = _text(obj, "outputs", where, required=True)
    prompt = "\n".join(t for t in (instruction.strip(), inputs.strip()) if t)
    if not prompt:
        raise data_error(f"{where}: both 'instruction' and 'inputs' are empty", REASON_MALFORMED)
    raw = obj.get("image_base64_str", [])
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list):
        raise data_error(f"{where}: 'image_base64_str' must be a list of base64 strings", REASON_MALFORMED)
    images = [base64_image(b64, f"{source} image {i}", where) for i, b64 in enumerate(raw)]
    messages = [Message("user", with_image_tags(prompt, len(images))), Message("assistant", outputs)]
    return [ConversationRecord(id=rec_id, messages=messages, images=images, source=source)]


def read_m3it(path: Path, policy: BadRecordPolicy = "skip", counter: BadRecordCounter | None = None,
              check: str = "decode") -> Iterator[ConversationRecord]:
    """Stream an M3IT .jsonl (or a .json list) as ConversationRecords; images stay encoded in memory
    until used (ImageRef). `check` is how hard each image is checked (decode, header, none)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return stream_records(iter_json_items(path), parse_m3it, policy, counter, check, str(path))

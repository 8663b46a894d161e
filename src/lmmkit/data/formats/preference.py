"""Preference datasets in their published formats -> PreferenceRecords.

Two formats, each as JSON (a list) or JSON lines (.jsonl):

* chosen/rejected pairs, the shape TRL and RLHF-V style datasets use::

      {"id": "7", "image": "a.png", "prompt": "<image>\\nWhat is here?", "chosen": "...", "rejected": "..."}

  The prompt may be "prompt" or "question" (a string), or "conversations" (LLaVA turns) or
  "messages" (role/content turns); chosen and rejected may be strings or TRL's conversational
  form (a list of messages whose last one is the assistant's answer). Images: "image", "images",
  "image_path" or "img_path" (a string or a list). A prompt with images but no `<image>` tag gets
  one tag per image in front, the LLaVA convention.

* VLFeedback (Silkie): ``{"id", "prompt", "img_path", "models", "completions": [{"model",
  "response", "annotations": {"Helpfulness": {"Rating": "4", "Rationale": ...}, "Visual
  Faithfulness": {...}, "Ethical Considerations": {...}}}]}``. Each completion's score is the mean
  of its numeric ratings over the chosen aspects (non-numeric ratings such as "N/A" are left out of
  the mean); every pair of completions with different scores becomes one record, the higher one
  chosen; ties are dropped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmmkit import IMAGE_TOKEN
from lmmkit.atomic import atomic_open
from lmmkit.data.check import REASON_MALFORMED, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.formats.llava import SPEAKER_TO_ROLE, read_with_policy
from lmmkit.data.images import load_image, require_image_file, resolve_image_path
from lmmkit.data.preference import PreferenceRecord
from lmmkit.data.schema import DataError, Message

VLFEEDBACK_ASPECTS: tuple[str, ...] = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
_IMAGE_KEYS = ("image", "images", "image_path", "img_path")


def _image_refs(obj: dict, where: str) -> list[str]:
    for key in _IMAGE_KEYS:
        if key in obj and obj[key] is not None:
            refs = obj[key]
            if isinstance(refs, str):
                return [refs]
            if isinstance(refs, list) and all(isinstance(r, str) for r in refs):
                return list(refs)
            raise data_error(f"{where}: '{key}' must be a string or a list of strings", REASON_MALFORMED)
    return []


def _turns(value: Any, where: str, key: str) -> list[Message]:
    """LLaVA turns ({"from", "value"}) or role/content messages -> Messages."""
    if not isinstance(value, list) or not value:
        raise data_error(f"{where}: '{key}' must be a non-empty list of turns", REASON_MALFORMED)
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise data_error(f"{where}: {key}[{i}] is not an object", REASON_MALFORMED)
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = SPEAKER_TO_ROLE.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(text, str):
            raise data_error(f"{where}: {key}[{i}] needs a speaker (from/role: human, gpt, user, assistant, system) "
                             f"and a text (value/content); got {sorted(turn)}", REASON_MALFORMED)
        out.append(Message(role, text))
    return out


def _answer(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, list):  # TRL conversational form: the answer is the last assistant message
        msgs = _turns(value, where, key)
        if msgs[-1].role != "assistant":
            raise data_error(f"{where}: the last message of '{key}' is not the assistant's", REASON_MALFORMED)
        return msgs[-1].content
    if value is None:
        raise data_error(f"{where}: '{key}' is missing", "empty chosen or rejected")
    if not isinstance(value, str):
        raise data_error(f"{where}: '{key}' is a {type(value).__name__}, not a string", REASON_MALFORMED)
    return value


def _with_image_tags(prompt: list[Message], n_images: int) -> list[Message]:
    if n_images and not any(IMAGE_TOKEN in m.content for m in prompt):
        first_user = next((i for i, m in enumerate(prompt) if m.role == "user"), None)
        if first_user is None:
            return prompt  # validate() rejects a prompt without a user turn
        tags = "\n".join([IMAGE_TOKEN] * n_images)
        prompt = list(prompt)
        prompt[first_user] = Message("user", f"{tags}\n{prompt[first_user].content}")
    return prompt


def _prompt(obj: dict, where: str) -> list[Message]:
    for key in ("conversations", "messages"):
        if key in obj:
            return _turns(obj[key], where, key)
    for key in ("prompt", "question"):
        if key in obj:
            value = obj[key]
            if isinstance(value, list):
                return _turns(value, where, key)
            if isinstance(value, str) and value.strip():
                return [Message("user", value)]
            raise data_error(f"{where}: '{key}' must be a non-empty string or a list of turns", REASON_MALFORMED)
    raise data_error(f"{where}: no prompt (expected one of prompt, question, conversations, messages)",
                     REASON_MALFORMED)


def _finish(record: PreferenceRecord, refs: list[str], image_folder: Path | None, open_images: bool
            ) -> PreferenceRecord:
    record.prompt = _with_image_tags(record.prompt, len(refs))
    record.images = list(refs)
    record.validate()
    record.images = [resolve_image_path(ref, image_folder, record.where) for ref in refs]
    for img in record.images:
        if open_images:
            load_image(img, record.where).close()
        else:
            require_image_file(img, record.where)
    return record


def _pair_record(obj: Any, source: str, fallback_id: str, image_folder: Path | None,
                 open_images: bool) -> PreferenceRecord:
    if not isinstance(obj, dict):
        raise data_error(f"{source}: record is a JSON {type(obj).__name__}, not an object", REASON_MALFORMED)
    rec_id = str(obj.get("id", fallback_id))
    where = f"{source} (id={rec_id})"
    ratings = {k: obj.get(f"{k}_rating") for k in ("chosen", "rejected")}
    record = PreferenceRecord(rec_id, _prompt(obj, where), _answer(obj, "chosen", where),
                              _answer(obj, "rejected", where), source=source,
                              chosen_rating=_number(ratings["chosen"]), rejected_rating=_number(ratings["rejected"]))
    return _finish(record, _image_refs(obj, where), image_folder, open_images)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def vlfeedback_score(completion: dict, aspects: tuple[str, ...] = VLFEEDBACK_ASPECTS) -> float | None:
    """Mean of the completion's numeric ratings over `aspects`; None when it has none."""
    notes = completion.get("annotations") or {}
    values = [_number((notes.get(a) or {}).get("Rating")) for a in aspects if isinstance(notes.get(a), dict)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _vlfeedback_records(obj: Any, source: str, fallback_id: str, image_folder: Path | None, open_images: bool,
                        aspects: tuple[str, ...]) -> list[PreferenceRecord]:
    if not isinstance(obj, dict):
        raise data_error(f"{source}: record is a JSON {type(obj).__name__}, not an object", REASON_MALFORMED)
    rec_id = str(obj.get("id", fallback_id))
    where = f"{source} (id={rec_id})"
    completions = obj.get("completions")
    if not isinstance(completions, list):
        raise data_error(f"{where}: 'completions' is missing or not a list", REASON_MALFORMED)
    scored = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise data_error(f"{where}: completions[{i}] has no 'response' text", REASON_MALFORMED)
        score = vlfeedback_score(c, aspects)
        if score is not None and c["response"].strip():
            scored.append((i, score, c["response"]))
    prompt = _prompt(obj, where)
    refs = _image_refs(obj, where)
    out = []
    for (i, si, ri), (j, sj, rj) in itertools.combinations(scored, 2):
        if si == sj or ri.strip() == rj.strip():
            continue  # ties (and duplicate answers) carry no preference
        (ci, cs, cr), (ji, js, jr) = ((i, si, ri), (j, sj, rj)) if si > sj else ((j, sj, rj), (i, si, ri))
        record = PreferenceRecord(f"{rec_id}#{ci}>{ji}", prompt, cr, jr, source=source, chosen_rating=cs,
                                  rejected_rating=js)
        out.append(_finish(record, refs, image_folder, open_images))
    return out


def read_preferences(path: Path, image_folder: Path | None, fmt: str = "auto", policy: BadRecordPolicy = "skip",
                     counter: BadRecordCounter | None = None, open_images: bool = False,
                     aspects: tuple[str, ...] = VLFEEDBACK_ASPECTS) -> Iterator[PreferenceRecord]:
    """Read chosen/rejected pairs ("pairs") or VLFeedback ("vlfeedback"); "auto" decides per record by
    whether it has 'completions'. Bad records follow `policy`, as in the SFT loader."""
    path = Path(path)
    if fmt not in ("auto", "pairs", "vlfeedback"):
        raise ValueError(f"unknown preference format {fmt!r}; choose auto, pairs or vlfeedback")
    if not path.is_file():
        raise DataError(f"{path}: preference file not found")

    def parse(obj: Any, source: str, fallback_id: str) -> list[PreferenceRecord]:
        is_vlf = fmt == "vlfeedback" or (fmt == "auto" and isinstance(obj, dict) and "completions" in obj)
        if is_vlf:
            return _vlfeedback_records(obj, source, fallback_id, image_folder, open_images, aspects)
        return [_pair_record(obj, source, fallback_id, image_folder, open_images)]

    yield from read_with_policy(path, parse, policy, counter)


def write_preferences(records: Iterable[PreferenceRecord], path: Path, image_folder: Path) -> int:
    """Write records as chosen/rejected pairs (LLaVA turns for the prompt), atomically. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(image_folder).expanduser().resolve()
    rows = []
    for r in records:
        r.validate()
        refs = []
        for img in r.images:
            resolved = Path(img).expanduser().resolve()
            if not resolved.is_relative_to(folder):
                raise DataError(f"{r.where}: image {resolved} is outside the image folder {folder}")
            refs.append(resolved.relative_to(folder).as_posix())
        row: dict[str, Any] = {"id": r.id, "image": refs[0] if len(refs) == 1 else refs,
                               "conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m.role, m.role),
                                                  "value": m.content} for m in r.prompt],
                               "chosen": r.chosen, "rejected": r.rejected}
        if not refs:
            del row["image"]
        rows.append(row)
    with atomic_open(path) as f:
        if path.suffix.lower() == ".jsonl":
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, f, ensure_ascii=False, indent=0)
    return len(rows)

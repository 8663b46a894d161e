"""Multimodal ArXiv (Li et al., 2024): ArXivCap figure-caption pairs and ArXivQA multiple choice.

ArXivCap, as published (parquet files under data/, one row per paper; also read as JSON lines with the
same fields)::

    {"src": ..., "arxiv_id": "2101.00001", "title": ..., "abstract": ..., "meta": {...},
     "caption_images": [                         # one entry per figure
        {"caption": "Figure 2: (a) ... (b) ...",
         "cil_pairs": [                           # its sub-figures (one pair for a single image)
            {"sub_caption": "(a)", "image_file": "2101.00001/fig2a.png",
             "image": {"bytes": ..., "path": ...}, "image_ocr": [...]}]}]}

Each figure becomes one record: its sub-figures' images (embedded bytes, else `image_file` under the
image root), a request for the caption, and the caption as the answer (the main caption already
describes the panels, so sub-captions are not repeated). A figure without a caption or images is
skipped and counted on its own; the paper's other figures still load.

ArXivQA (arxivqa.jsonl + images.tgz, which unpacks to images/...)::

    {"id": "...", "image": "images/2101.00001_0.jpg", "question": "...",
     "options": ["A) ...", "B) ...", ...], "label": "B", "rationale": "..."}

The user turn is the question with its options one per line (options without a letter get "A) ", ...);
the answer is the chosen option's line, then the rationale on the next line (`rationale=False`: the
option only). `label` may be a letter ("B", "(B)", "B) ...") or an option's text.

Which fields are checked how: ArXivCap's caption_images / caption / cil_pairs / sub_caption / image
match public code that reads the published parquet; arxiv_id and image_file (used when a pair has no
embedded image) and the ArXivQA field names follow the dataset cards as recalled, not re-verified
here. Fields not listed are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmmkit import IMAGE_TOKEN
from lmmkit.data.check import REASON_MALFORMED, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.formats.common import iter_json_items, stream_records
from lmmkit.data.formats.hf_datasets import cell_image, iter_table_rows, require_columns
from lmmkit.data.images import resolve_image_path
from lmmkit.data.schema import ConversationRecord, DataError, Message

CAPTION_PROMPT = "Write the caption of this figure from a scientific paper."
SUBFIGURES_PROMPT = "These are the sub-figures of one figure from a scientific paper. Write the figure's caption."
ARXIVCAP_COLUMNS: tuple[str, ...] = ("arxiv_id", "caption_images")

_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[).:]\s*")
_LABEL_LETTER = re.compile(r"^\s*\(?([A-Z])(?:\s*[).:]|\s*$|\s+)")


# ------------------------------------------------------------------------------------------------
# ArXivCap
# ------------------------------------------------------------------------------------------------


def _figure_record(fig: Any, paper_id: str, source: str, j: int, root: Path | None
                   ) -> ConversationRecord | DataError:
    fig_source = f"{source}/fig{j}"
    rec_id = f"{paper_id}#fig{j}"
    where = f"{fig_source} (id={rec_id})"
    try:
        if not isinstance(fig, dict):
            raise data_error(f"{where}: caption_images[{j}] is not an object", REASON_MALFORMED)
        caption = fig.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise data_error(f"{where}: the figure has no caption", REASON_MALFORMED)
        pairs = fig.get("cil_pairs")
        if not isinstance(pairs, list) or not pairs:
            raise data_error(f"{where}: 'cil_pairs' (the figure's images) is missing or empty", REASON_MALFORMED)
        images = []
        for k, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise data_error(f"{where}: cil_pairs[{k}] is not an object", REASON_MALFORMED)
            cell = pair.get("image") or pair.get("image_file")
            images.append(cell_image(cell, f"{fig_source} image {k}", where, root))
        prompt = CAPTION_PROMPT if len(images) == 1 else SUBFIGURES_PROMPT
        tags = "\n".join([IMAGE_TOKEN] * len(images))
        messages = [Message("user", f"{tags}\n{prompt}"), Message("assistant", caption.strip())]
        return ConversationRecord(id=rec_id, messages=messages, images=images, source=fig_source)
    except DataError as err:
        return err


def parse_arxivcap(obj: Any, source: str, fallback_id: str, root: Path | None) -> list[ConversationRecord | DataError]:
    """One ArXivCap paper -> one record (or one DataError) per figure."""
    if not isinstance(obj, dict):
        raise data_error(f"{source}: record is a {type(obj).__name__}, not an object", REASON_MALFORMED)
    paper_id = str(obj.get("arxiv_id") or fallback_id)
    figures = obj.get("caption_images")
    if not isinstance(figures, list):
        raise data_error(f"{source} (id={paper_id}): 'caption_images' is missing or not a list", REASON_MALFORMED)
    return [_figure_record(fig, paper_id, source, j, root) for j, fig in enumerate(figures)]


def read_arxivcap(path: Path, image_root: Path | None = None, policy: BadRecordPolicy = "skip",
                  counter: BadRecordCounter | None = None, check: str = "decode") -> Iterator[ConversationRecord]:
    """Stream ArXivCap from a parquet file, a folder of them (data/*.parquet), or JSON lines."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no .parquet files in the folder")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: ArXivCap file not found")
    for f in files:
        if f.suffix == ".parquet":
            require_columns(f, {c: c for c in ARXIVCAP_COLUMNS})

    def items() -> Iterator[tuple[str, str, Any]]:
        for f in files:
            if f.suffix == ".parquet":  # only the needed columns: abstracts and OCR stay on disk
                for row, values in iter_table_rows(f, ARXIVCAP_COLUMNS):
                    yield f"{f}#{row}", str(row), values
            else:
                yield from iter_json_items(f)

    return stream_records(items(), lambda obj, src, fid: parse_arxivcap(obj, src, fid, root),
                          policy, counter, check, str(path))


# ------------------------------------------------------------------------------------------------
# ArXivQA
# ------------------------------------------------------------------------------------------------


def _options(raw: Any, where: str) -> list[tuple[str, str]]:
    """[(letter, line)] with each line starting "X) "; a missing letter is added in order."""
    if not isinstance(raw, list) or not raw or not all(isinstance(o, str) for o in raw):
        raise data_error(f"{where}: 'options' must be a non-empty list of strings", REASON_MALFORMED)
    out = []
    for i, option in enumerate(raw):
        m = _LETTER_PREFIX.match(option)
        letter = m.group(1) if m else chr(ord("A") + i)
        line = option.strip() if m else f"{letter}) {option.strip()}"
        out.append((letter, line))
    return out


def _label_letter(label: Any, options: list[tuple[str, str]], where: str) -> str:
    letters = [letter for letter, _ in options]
    if isinstance(label, str):
        m = _LABEL_LETTER.match(label)
        if m and m.group(1) in letters:
            return m.group(1)
        text = label.strip()
        for letter, line in options:  # the label may be an option's text, with or without its letter
            if text and (text == line or text == _LETTER_PREFIX.sub("", line).strip()):
                return letter
    raise data_error(f"{where}: label {label!r} names none of the options ({', '.join(letters)})", REASON_MALFORMED)


def parse_arxivqa(obj: Any, source: str, fallback_id: str, root: Path | None, rationale: bool = True
                  ) -> list[ConversationRecord]:
    if not isinstance(obj, dict):
        raise data_error(f"{source}: record is a {type(obj).__name__}, not an object", REASON_MALFORMED)
    rec_id = str(obj.get("id", fallback_id))
    where = f"{source} (id={rec_id})"
    question, image = obj.get("question"), obj.get("image")
    if not isinstance(question, str) or not question.strip():
        raise data_error(f"{where}: 'question' must be a non-empty string", REASON_MALFORMED)
    if not isinstance(image, str) or not image:
        raise data_error(f"{where}: 'image' must be an image path", REASON_MALFORMED)
    options = _options(obj.get("options"), where)
    letter = _label_letter(obj.get("label"), options, where)
    answer = dict(options)[letter]
    why = obj.get("rationale")
    if rationale and isinstance(why, str) and why.strip():
        answer = f"{answer}\n{why.strip()}"
    prompt = "\n".join([f"{IMAGE_TOKEN}\n{question.strip()}", *(line for _, line in options)])
    return [ConversationRecord(id=rec_id, messages=[Message("user", prompt), Message("assistant", answer)],
                               images=[resolve_image_path(image, root, where)], source=source)]


def read_arxivqa(path: Path, image_root: Path | None = None, policy: BadRecordPolicy = "skip",
                 counter: BadRecordCounter | None = None, check: str = "decode", rationale: bool = True
                 ) -> Iterator[ConversationRecord]:
    """Stream ArXivQA JSON lines; image paths resolve under `image_root` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ArXivQA file not found")
    root = Path(image_root) if image_root is not None else path.parent
    return stream_records(iter_json_items(path), lambda obj, src, fid: parse_arxivqa(obj, src, fid, root, rationale),
                          policy, counter, check, str(path))

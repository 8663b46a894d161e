"""CapsFusion-style caption fusion: an LLM merges each raw alt-text with a synthetic caption.

CapsFusion (Yu et al., 2023) found that web alt-text carries real-world knowledge (names, places,
brands) in broken sentences, while captioner output (BLIP, ...) is fluent but generic; an LLM asked to
merge the two gives captions with both. `fuse_captions` streams caption pairs, asks the LLM once per
pair, and appends each result to a JSON lines file as soon as it is in order.

Input: JSON lines or a JSON list with the two captions in fields (default `raw`, `synthetic`, `id`),
or WebDataset shards (`wds:PATTERN`; the raw caption is `KEY.txt` unless the `.json` member has the raw
field, the synthetic one is that field of `KEY.json`, or a member `KEY.<field>`). An item without
both captions is a bad record (policy skip: counted by reason; stop: the run stops naming it).

Output, one line per item, in input order: the item's fields (for shards: `key`, `shard` and the
`.json` member's fields), `fused`, and `_fuse` = {index, where, model} (the item's 0-based position in
the input is the resume point). Every answer is cached (SQLite, key: LLM fingerprint + prompt +
settings) as it arrives, and every line is written whole and flushed before the next: a killed run,
rerun with the same command, drops a torn last line, skips the items already written, and asks the
LLM again only for the ones that were in flight.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmmkit.data.check import REASON_MALFORMED, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.schema import DataError

# As given in the CapsFusion paper (recalled, not checked against its code); --prompt-file replaces it.
CAPSFUSION_PROMPT = (
    "Please merge and refine the information from the two given sentences. Sentence 1 provides detailed "
    "real-world knowledge, yet it suffers from flaws in sentence structure and grammar. Sentence 2 exhibits "
    "nice sentence structure, but lacking in-depth real-world details and may contain false information. "
    "Please combine them into a new sentence, ensuring a well-structured sentence while retaining the detailed "
    "real-world information provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
    "Sentence 1: {raw}\nSentence 2: {synthetic}"
)
REASON_NO_CAPTION = "missing caption"
LLM_ERRORS: tuple[str, ...] = ("stop", "record")
_LABELS = ("merged sentence:", "new sentence:", "fused caption:", "caption:", "sentence:")
FSYNC_EVERY = 64


class Asker(Protocol):
    name: str

    def ask(self, prompt: str, temperature: float = 0.0, run: int = 0, max_new_tokens: int = 256) -> str: ...


@dataclass(frozen=True)
class CaptionPair:
    index: int  # 0-based position in the input, bad items included: where a rerun resumes
    where: str  # file#line, file#index or shard#key
    id: str
    raw: str
    synthetic: str
    row: dict[str, Any]  # what is written back, with `fused` added


@dataclass
class FuseReport:
    out: Path
    resumed_after: int = 0  # rows already in the output when the run started
    fused: int = 0
    failed: int = 0  # --on-llm-error record: rows written with fused = null
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)
    seconds: float = 0.0

    def summary(self) -> str:
        resumed = f" (resumed after {self.resumed_after} rows already written)" if self.resumed_after else ""
        failed = f", {self.failed} without a fusion (LLM error recorded)" if self.failed else ""
        return (f"{self.fused} captions fused in {self.seconds:.1f}s{failed}{resumed}; {self.counter.summary()}; "
                f"output {self.out}")


def check_prompt(template: str) -> str:
    missing = [k for k in ("{raw}", "{synthetic}") if k not in template]
    if missing:
        raise ValueError(f"the fusion prompt must contain {' and '.join(missing)} (where the captions go)")
    return template


def clean_fusion(text: str) -> str:
    """The merged caption out of a reply: trimmed, without a leading label or wrapping quotes."""
    text = text.strip()
    if text.lower().startswith(_LABELS):
        text = text.split(":", 1)[1].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" or text[:1] == "\u201c" and text[-1:] == "\u201d":
        text = text[1:-1].strip()
    return text


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise data_error(f"{where}: no {what} (field is {shown})", REASON_NO_CAPTION)
    return value.strip()


def _json_pairs(path: Path, raw_field: str, synthetic_field: str, id_field: str) -> Iterator[CaptionPair | DataError]:
    from lmmkit.data.formats.common import iter_json_items

    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    for index, (where, fallback_id, obj) in enumerate(iter_json_items(path)):
        if isinstance(obj, DataError):
            yield obj
            continue
        try:
            if not isinstance(obj, dict):
                raise data_error(f"{where}: item is a JSON {type(obj).__name__}, not an object", REASON_MALFORMED)
            raw = _text(obj.get(raw_field), f"raw caption '{raw_field}'", where)
            synthetic = _text(obj.get(synthetic_field), f"synthetic caption '{synthetic_field}'", where)
        except DataError as err:
            yield err
            continue
        yield CaptionPair(index, where, str(obj.get(id_field, fallback_id)), raw, synthetic, obj)


def _shard_pairs(pattern: str, raw_field: str, synthetic_field: str) -> Iterator[CaptionPair | DataError]:
    from lmmkit.data.formats.webdataset import iter_tar_groups
    from lmmkit.data.shards import expand_shards, open_shard

    index = 0
    for shard in expand_shards(pattern):
        with open_shard(shard) as f:
            for item in iter_tar_groups(f, shard):
                if isinstance(item, DataError):
                    yield item
                    continue
                key, files = item
                where, index = f"{shard}#{key}", index + 1
                try:
                    meta = json.loads(files["json"].decode("utf-8")) if "json" in files else {}
                    if not isinstance(meta, dict):
                        raise data_error(f"{where}: {key}.json is not a JSON object", REASON_MALFORMED)
                    raw = meta.get(raw_field) if raw_field in meta else files.get("txt", b"").decode("utf-8")
                    synthetic = meta.get(synthetic_field)
                    if synthetic is None and synthetic_field in files:
                        synthetic = files[synthetic_field].decode("utf-8")
                    pair = CaptionPair(index - 1, where, key, _text(raw, f"raw caption ({key}.txt)", where),
                                       _text(synthetic, f"synthetic caption '{synthetic_field}'", where),
                                       {"key": key, "shard": shard, **meta})
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield data_error(f"{where}: unreadable member ({e})", REASON_MALFORMED)
                    continue
                except DataError as err:
                    yield err
                    continue
                yield pair


def iter_caption_pairs(source: str, raw_field: str = "raw", synthetic_field: str = "synthetic", id_field: str = "id",
                       policy: BadRecordPolicy = "skip", counter: BadRecordCounter | None = None
                       ) -> Iterator[CaptionPair]:
    """Caption pairs of a JSON / JSON lines file or of `wds:` shards, in order; bad items through `policy`."""
    counter = counter if counter is not None else BadRecordCounter()
    if source.startswith("wds:"):
        items = _shard_pairs(source[4:], raw_field, synthetic_field)
    else:
        items = _json_pairs(Path(source).expanduser(), raw_field, synthetic_field, id_field)
    for item in items:
        if isinstance(item, DataError):
            counter.handle(item, policy)
            continue
        yield item


def _line_start(f, end: int) -> int:
    """Where the line holding byte `end - 1` starts (0 when no newline comes before it)."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        chunk = f.read(pos - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def resume_point(out: Path) -> tuple[int, dict[str, Any] | None]:
    """(rows already written, the last row) of an output file, after cutting a torn last line off."""
    if not out.exists():
        return 0, None
    with out.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = _line_start(f, size)  # just after the last newline
        if keep < size:
            f.truncate(keep)  # a line cut by a kill: its item is asked again (from the cache)
        if not keep:
            return 0, None
        f.seek(0)
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        start = _line_start(f, keep - 1)
        f.seek(start)
        last_line = f.read(keep - 1 - start)
    try:
        last = json.loads(last_line)
        int(last["_fuse"]["index"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{out}: line {rows} is not a fuse-captions row (no _fuse.index); not appending to it. "
                        "Give another --out, or delete the file to start over") from None
    return rows, last


def fuse_captions(pairs: Iterator[CaptionPair], out: Path, llm: Asker, *, prompt: str = CAPSFUSION_PROMPT,
                  temperature: float = 0.0, max_new_tokens: int = 128, concurrency: int = 1,
                  on_llm_error: str = "stop", limit: int | None = None, counter: BadRecordCounter | None = None,
                  progress: Callable[[FuseReport], None] | None = None) -> FuseReport:
    """Fuse every pair not yet in `out` and append the rows (see the module docstring); returns a report.
    An LLM failure stops the run (everything before it is saved) unless `on_llm_error` is "record"."""
    from lmmkit.eval.backends.base import BackendError

    if on_llm_error not in LLM_ERRORS:
        raise ValueError(f"on_llm_error must be one of {', '.join(LLM_ERRORS)}, not {on_llm_error!r}")
    check_prompt(prompt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = FuseReport(out=out, counter=counter if counter is not None else BadRecordCounter())
    report.resumed_after, last = resume_point(out)
    last_index = int(last["_fuse"]["index"]) if last else -1
    start = time.perf_counter()

    def ask(pair: CaptionPair) -> str:
        reply = clean_fusion(llm.ask(prompt.format(raw=pair.raw, synthetic=pair.synthetic), temperature=temperature,
                                     max_new_tokens=max_new_tokens))
        if not reply:
            raise BackendError("the LLM's reply is empty")
        return reply

    def write(f, pair: CaptionPair, fused: str | None, error: str | None) -> None:
        row = {**pair.row, "fused": fused,
               "_fuse": {"index": pair.index, "id": pair.id, "where": pair.where, "model": llm.name}}
        if error is not None:
            row["fuse_error"] = error
        f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per whole line
        f.flush()
        done = report.fused + report.failed
        if done % FSYNC_EVERY == 0:
            os.fsync(f.fileno())
        if progress is not None:
            progress(report)

    pending: deque[tuple[CaptionPair, Future]] = deque()
    window = max(1, 2 * concurrency)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, out.open("a", encoding="utf-8") as f:
        def drain(until: int) -> None:
            while len(pending) > until:
                pair, future = pending.popleft()
                try:
                    fused, error = future.result(), None
                    report.fused += 1
                except BackendError as err:
                    if on_llm_error == "stop":
                        for _, other in pending:
                            other.cancel()
                        raise DataError(f"{pair.where} (id={pair.id}): the LLM gave no fusion: {err}. The "
                                        f"{report.resumed_after + report.fused + report.failed} rows before it are "
                                        f"saved in {out}; run the same command again to resume") from err
                    fused, error = None, str(err)
                    report.failed += 1
                write(f, pair, fused, error)

        try:
            submitted = 0
            for pair in pairs:
                if pair.index <= last_index:
                    if pair.index == last_index and last is not None and last["_fuse"].get("id") != pair.id:
                        raise DataError(f"{out} was written from another input: its last row is item {last_index} "
                                        f"with id {last['_fuse'].get('id')!r}, but item {last_index} of this input "
                                        f"({pair.where}) has id {pair.id!r}")
                    continue
                if limit is not None and submitted >= limit:
                    break
                pending.append((pair, pool.submit(ask, pair)))
                submitted += 1
                drain(window)
            drain(0)
        finally:
            for _, future in pending:
                future.cancel()
            f.flush()
            os.fsync(f.fileno())
            report.seconds = time.perf_counter() - start
    return report

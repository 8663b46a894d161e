"""One spec string names any data source; `open_source` streams it as ConversationRecords.

    KIND:PATH[@ROOT[,ROOT...]][#KEY=VALUE[,KEY=VALUE...]]

PATH is the data (file, folder, shard pattern); ROOT is where relative image paths are looked up
(default: the data file's folder); options follow the last "#". Kinds:

    wds:/data/cc3m/{00000..00331}.tar#seed=3   WebDataset shards (brace ranges, globs, fsspec URLs;
                                               several patterns joined with "::"), shard order
                                               shuffled by seed, resumable (see WebDatasetStream)
    llava:train.json@/data/images              LLaVA JSON / JSON lines
    sharegpt4v:sharegpt4v_cap100k.json@/data/sharegpt4v,/mnt/coco
                                               ShareGPT4V; several roots, searched in order
    m3it:/data/m3it/coco/train.jsonl           M3IT JSON lines with base64 images
    arxivqa:arxivqa.jsonl@/data/arxivqa        ArXivQA (#rationale=0: answers without the rationale)
    arxivcap:/data/ArxivCap/data               ArXivCap parquet files (a file or a folder) or JSON lines
    hf:/data/my_set#image=img,user=question,assistant=answer
                                               a local HF dataset folder (parquet / Arrow) with a
                                               column mapping (also system=COL, id=COL)

Every kind takes `check=decode|header|none` (how hard images are checked while reading; default
decode). Bad records are skipped and counted (policy "skip") or stop the stream ("stop"), and every
message names the file or shard and the record.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.formats.common import iter_json_items, stream_records
from lmmkit.data.schema import ConversationRecord, DataError

KINDS: dict[str, str] = {
    "wds": "WebDataset tar shards (img2dataset layout)",
    "llava": "LLaVA JSON / JSON lines",
    "sharegpt4v": "ShareGPT4V JSON (LLaVA conversations, several image roots)",
    "m3it": "M3IT JSON lines with base64 images",
    "arxivqa": "ArXivQA JSON lines (multiple choice with rationale)",
    "arxivcap": "ArXivCap parquet (or JSON lines): figure-caption pairs with sub-figures",
    "hf": "a local Hugging Face dataset folder (parquet / Arrow) with a column mapping",
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "wds": ("seed",), "llava": (), "sharegpt4v": (), "m3it": (), "arxivqa": ("rationale",), "arxivcap": (),
    "hf": ("image", "user", "assistant", "system", "id"),
}
CHECKS: tuple[str, ...] = ("decode", "header", "none")


class SourceSpecError(ValueError):
    """A source spec that cannot be understood; the message shows the syntax."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    roots: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}"
        if self.roots:
            text += "@" + ",".join(self.roots)
        if self.options:
            text += "#" + ",".join(f"{k}={v}" for k, v in self.options.items())
        return text


def parse_source(spec: str) -> SourceSpec:
    """Split a spec into kind, path, image roots and options (see the module docstring)."""
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in KINDS:
        listed = "\n".join(f"  {k}: {v}" for k, v in KINDS.items())
        raise SourceSpecError(f"source {spec!r}: expected KIND:PATH[@ROOT][#KEY=VALUE,...] with KIND one of\n{listed}")
    rest, hash_, opt_text = rest.rpartition("#") if "#" in rest else (rest, "", "")
    path, at, root_text = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not path:
        raise SourceSpecError(f"source {spec!r}: no path after {kind}:")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in opt_text.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise SourceSpecError(f"source {spec!r}: option {part!r} is not KEY=VALUE")
        allowed = (*_OPTIONS[kind], "check")
        if key not in allowed:
            raise SourceSpecError(f"source {spec!r}: {kind} takes the options {', '.join(allowed)}, not {key!r}")
        options[key] = value
    if options.get("check", "decode") not in CHECKS:
        raise SourceSpecError(f"source {spec!r}: check must be one of {', '.join(CHECKS)}")
    roots = tuple(r for r in root_text.split(",") if r) if at else ()
    if roots and kind in ("wds", "m3it", "hf"):
        raise SourceSpecError(f"source {spec!r}: {kind} data carries its images; it takes no @ROOT")
    if len(roots) > 1 and kind != "sharegpt4v":
        raise SourceSpecError(f"source {spec!r}: only sharegpt4v takes several image roots")
    return SourceSpec(kind, path, roots, options)


def _int_option(spec: SourceSpec, key: str) -> int | None:
    value = spec.options.get(key)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise SourceSpecError(f"source {spec}: {key} must be an integer, not {value!r}") from None


def _read_llava_stream(path: Path, root: Path, policy: BadRecordPolicy, counter: BadRecordCounter | None,
                       check: str) -> Iterator[ConversationRecord]:
    # read_llava loads a .json list whole; this reads it record by record with the same parsing.
    from lmmkit.data.formats.llava import _parse_record

    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return stream_records(iter_json_items(path), lambda obj, src, fid: [_parse_record(obj, src, fid, root)],
                          policy, counter, check, str(path))


def open_source(spec: str | SourceSpec, policy: BadRecordPolicy = "skip", counter: BadRecordCounter | None = None,
                check: str | None = None, state: Mapping[str, Any] | None = None) -> Iterator[ConversationRecord]:
    """Stream the records a spec names. `check` overrides the spec's check option; `state` resumes a
    wds stream where `state_dict()` said it was (other kinds do not resume yet: phase 2)."""
    spec = spec if isinstance(spec, SourceSpec) else parse_source(spec)
    check = check or spec.options.get("check", "decode")
    if check not in CHECKS:
        raise SourceSpecError(f"check must be one of {', '.join(CHECKS)}, not {check!r}")
    if state is not None and spec.kind != "wds":
        raise SourceSpecError(f"source {spec}: only wds streams resume from a state")
    path = Path(spec.path).expanduser() if spec.kind != "wds" else None
    roots = [Path(r).expanduser() for r in spec.roots]
    root = roots[0] if roots else None
    if spec.kind == "wds":
        from lmmkit.data.formats.webdataset import WebDatasetStream

        return WebDatasetStream(spec.path, seed=_int_option(spec, "seed"), policy=policy, counter=counter,
                                check=check, state=state)
    if spec.kind == "llava":
        return _read_llava_stream(path, root or path.parent, policy, counter, check)
    if spec.kind == "sharegpt4v":
        from lmmkit.data.formats.sharegpt4v import read_sharegpt4v

        return read_sharegpt4v(path, roots or None, policy, counter, check)
    if spec.kind == "m3it":
        from lmmkit.data.formats.m3it import read_m3it

        return read_m3it(path, policy, counter, check)
    if spec.kind == "arxivqa":
        from lmmkit.data.formats.arxiv import read_arxivqa

        rationale = spec.options.get("rationale", "1") not in ("0", "false", "no")
        return read_arxivqa(path, root, policy, counter, check, rationale=rationale)
    if spec.kind == "arxivcap":
        from lmmkit.data.formats.arxiv import read_arxivcap

        return read_arxivcap(path, root, policy, counter, check)
    from lmmkit.data.formats.hf_datasets import parse_column_map, read_hf_folder

    mapping = {k: v for k, v in spec.options.items() if k != "check"}
    try:
        columns = parse_column_map(",".join(f"{k}={v}" for k, v in mapping.items()))
    except ValueError as e:
        raise SourceSpecError(f"source {spec}: {e}") from e
    return read_hf_folder(path, columns, policy, counter, check)

"""`lmmkit data dedup`: exact and near-duplicate images, and caption length filters, over a stream.

* Exact: a hash of the decoded pixels (size + RGB bytes), so one picture saved as JPEG and as PNG
  at the same quality, or re-saved with different metadata, is still one picture when its pixels match.
* Near (--near): a 64-bit difference hash (dHash): the image shrunk to 9x8 grey levels, one bit per
  "is this pixel brighter than its right neighbour". Resizing, recompression and small edits change
  few bits; two images within `threshold` bits are near duplicates. Lookup is multi-index hashing:
  the 64 bits are cut into threshold+1 bands, and two hashes within `threshold` bits must agree
  exactly on at least one band (pigeonhole), so each lookup only compares against hashes sharing a
  band, never the whole set.

The first record with an image wins; later ones are reported and (unless report-only) dropped. A
record's key is its images' hashes in order; near matching applies to single-image records.
Records without images pass through. Caption filters look at the assistant text: its length in characters,
and (`languages`) the language it is in (lmmkit.data.language; dropped records counted by language).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.image_ref import open_image
from lmmkit.data.language import LanguageFilter
from lmmkit.data.schema import ConversationRecord, DataError

HASH_BITS = 64
MAX_REPORTED_PAIRS = 1000


def dhash(image: Image.Image, side: int = 8) -> int:
    """A side*side-bit difference hash of `image` (64 bits for side 8)."""
    grey = np.asarray(image.convert("L").resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def pixel_hash(image: Image.Image) -> str:
    """Identical pixels <=> identical hash (size and mode included, so a 2x8 and an 8x2 image differ)."""
    rgb = image.convert("RGB")
    digest = hashlib.blake2b(f"{rgb.width}x{rgb.height}".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearIndex:
    """Hashes seen so far, found again within `threshold` bits by multi-index hashing."""

    def __init__(self, threshold: int, bits: int = HASH_BITS) -> None:
        if not 0 <= threshold < bits:
            raise ValueError(f"near-duplicate threshold must be in 0..{bits - 1} bits, got {threshold}")
        self.threshold, self.bits = threshold, bits
        n_bands = threshold + 1
        edges = [round(i * bits / n_bands) for i in range(n_bands + 1)]
        self.bands = [(lo, hi - lo) for lo, hi in zip(edges, edges[1:], strict=False)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << width) - 1) for lo, width in self.bands]

    def find(self, h: int) -> tuple[int, int] | None:
        """(index of an earlier hash, distance) within the threshold, the closest such; else None."""
        best: tuple[int, int] | None = None
        for table, key in zip(self.tables, self._keys(h), strict=True):
            for i in table.get(key, ()):
                d = hamming(h, self.hashes[i])
                if d <= self.threshold and (best is None or d < best[1]):
                    best = (i, d)
        return best

    def add(self, h: int) -> int:
        i = len(self.hashes)
        self.hashes.append(h)
        for table, key in zip(self.tables, self._keys(h), strict=True):
            table.setdefault(key, []).append(i)
        return i


@dataclass
class DedupReport:
    n_in: int = 0
    n_kept: int = 0
    exact: int = 0
    near: int = 0
    too_short: int = 0
    too_long: int = 0
    wrong_language: Counter[str] = field(default_factory=Counter)  # dropped by the language filter, by language
    dropped: bool = True
    pairs: list[dict[str, Any]] = field(default_factory=list)
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)

    def as_dict(self) -> dict[str, Any]:
        return {"records_in": self.n_in, "records_kept": self.n_kept, "exact_duplicates": self.exact,
                "near_duplicates": self.near, "caption_too_short": self.too_short, "caption_too_long": self.too_long,
                "language_dropped": dict(self.wrong_language.most_common()), "duplicates_dropped": self.dropped,
                "bad_records": self.counter.as_dict(),
                "pairs": self.pairs, "pairs_truncated": len(self.pairs) >= MAX_REPORTED_PAIRS}

    def summary(self) -> str:
        verb = "dropped" if self.dropped else "found (kept: report only)"
        languages = ", ".join(f"{n} {lang}" for lang, n in self.wrong_language.most_common())
        return (f"{self.n_in} records in, {self.n_kept} kept; duplicates {verb}: {self.exact} exact, {self.near} near; "
                f"caption filter dropped {self.too_short} too short, {self.too_long} too long"
                + (f", by language {languages}" if languages else "") + f"; {self.counter.summary()}")


def dedup_records(records: Iterable[ConversationRecord], report: DedupReport, *, near: bool = False,
                  threshold: int = 4, min_chars: int | None = None, max_chars: int | None = None,
                  languages: LanguageFilter | None = None, drop: bool = True,
                  policy: BadRecordPolicy = "skip") -> Iterator[ConversationRecord]:
    """Filter a record stream, filling `report` as it goes (complete once the stream is exhausted).

    Memory grows with the number of distinct images (a 16-byte hash each, plus the band tables with
    --near), never with their pixels: each image is decoded, hashed and let go."""
    report.dropped = drop
    exact_seen: dict[tuple[str, ...], str] = {}
    index = NearIndex(threshold) if near else None
    near_where: list[str] = []

    def note(kind: str, record: ConversationRecord, first: str, distance: int | None = None) -> None:
        if len(report.pairs) < MAX_REPORTED_PAIRS:
            pair = {"kind": kind, "duplicate": record.where, "first": first}
            if distance is not None:
                pair["distance"] = distance
            report.pairs.append(pair)

    for record in records:
        report.n_in += 1
        answers = [m.content.strip() for m in record.messages if m.role == "assistant"]
        chars = sum(len(a) for a in answers)
        if min_chars is not None and chars < min_chars:
            report.too_short += 1
            continue
        if max_chars is not None and chars > max_chars:
            report.too_long += 1
            continue
        if languages is not None and (why := languages.verdict("\n".join(answers))) is not None:
            report.wrong_language[why] += 1
            continue
        try:
            decoded = [open_image(img, record.where) for img in record.images]
        except DataError as err:
            report.counter.handle(err, policy)
            continue
        if decoded:
            key = tuple(pixel_hash(im) for im in decoded)
            first = exact_seen.get(key)
            if first is not None:
                report.exact += 1
                note("exact", record, first)
                if drop:
                    continue
            else:
                exact_seen[key] = record.where
                if index is not None and len(decoded) == 1:
                    h = dhash(decoded[0])
                    match = index.find(h)
                    if match is not None:
                        report.near += 1
                        note("near", record, near_where[match[0]], match[1])
                        if drop:
                            continue
                    else:
                        index.add(h)
                        near_where.append(record.where)
        report.n_kept += 1
        yield record

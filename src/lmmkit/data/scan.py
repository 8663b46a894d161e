"""`lmmkit data scan SOURCE --model M`: flag image-caption pairs that look poisoned (ImgTrojan and kin).

Three checks, each a reason a record is flagged:

* ``loss``: the answer is unlikely under a reference VLM given the image. Each record's mean per-token
  loss on its assistant turns (teacher-forced, what training would minimise) is turned into a robust
  z-score, 0.6745 (x - median) / MAD; above `z_threshold` (3.5, Iglewicz and Hoaglin's cut-off) is an
  outlier. Median and MAD, not mean and sd: the poison itself must not widen the yardstick.
* ``repeated-caption``: one answer text over many *different* images. A short caption legitimately repeats
  over similar images ("pink star." for every lone pink star) and answers of fewer than `min_words` words
  ("yes", "no", "2") repeat over anything, so a group counts only when it is long enough and its images are
  hardly more alike than random pairs of the dataset: the mean cosine similarity of their tower features
  (max-pooled over the image, centred on the dataset mean so what every image shares drops out) is below
  `max_group_similarity`. Without a model every such group is flagged. The same (image, answer) pair repeated `min_repeats` times is flagged too
  (``repeated-pair``: one fixed trigger image flooding the set).
* ``near-duplicate``: two images within `near_bits` bits of 64-bit dHash (lmmkit.data.dedup) whose changed
  pixels (at 64x64) fit in a box of at most `max_changed` of the image (a pasted patch, not another scene),
  and whose answers
  share few words (Jaccard <= `max_jaccard`): a trigger-patched copy of a clean image with another caption. Of the two, the one with the higher loss is flagged (both
  without a model).

With a poison manifest (lmmkit.data.poison) the scan also reports precision and recall per check and for
their union; records are matched by their position in the data file (the N of "file.json#N").
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.dedup import NearIndex, dhash, pixel_hash
from lmmkit.data.image_ref import open_image
from lmmkit.data.poison import MANIFEST, image_name, open_dataset, read_manifest
from lmmkit.data.schema import ConversationRecord, DataError

CHECKS: tuple[str, ...] = ("loss", "repeated-caption", "repeated-pair", "near-duplicate")
SIDE = 64  # images are compared at SIDE x SIDE
CHANGED = 0.1  # a pixel "changed" when a channel moves by more than this (0..1): recompression stays below


@dataclass
class ScanSettings:
    z_threshold: float = 3.5
    min_repeats: int = 5
    max_group_similarity: float = 0.2
    near_bits: int = 4
    max_changed: float = 0.02  # near duplicates: the changed pixels' box covers at most this share (a patch)
    min_words: int = 4  # repeated caption: shorter answers (yes / no / a number) repeat over images by nature
    max_jaccard: float = 0.2
    batch_size: int = 64
    max_length: int = 512


@dataclass
class ScanResult:
    n_records: int
    flagged: list[dict[str, Any]]
    losses: list[float | None]
    counts: dict[str, int]
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)
    evaluation: dict[str, Any] | None = None

    def summary(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{len(self.flagged)} of {self.n_records} records flagged ({per}); {self.counter.summary()}"


def answer_text(record: ConversationRecord) -> str:
    """The record's assistant turns, lower-cased with whitespace collapsed: what "the same caption" means."""
    return re.sub(r"\s+", " ", " ".join(m.content for m in record.messages if m.role == "assistant")).strip().lower()


def jaccard(a: str, b: str) -> float:
    wa, wb = set(re.findall(r"\w+", a)), set(re.findall(r"\w+", b))
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def robust_z(values: Sequence[float]) -> list[float]:
    """0.6745 (x - median) / MAD; with MAD 0, the mean absolute deviation (x 1.2533) stands in; else all 0."""
    if not values:
        return []
    med = statistics.median(values)
    dev = [abs(v - med) for v in values]
    mad = statistics.median(dev)
    if mad > 0:
        return [0.6745 * (v - med) / mad for v in values]
    mean_ad = sum(dev) / len(dev)
    return [(v - med) / (1.2533 * mean_ad) if mean_ad > 0 else 0.0 for v in values]


def record_losses(model, records: Sequence[ConversationRecord], batch_size: int = 64,
                  max_length: int = 512) -> tuple[list[float | None], Any]:
    """Mean per-token loss of each record's assistant tokens under `model` given its images (None where the
    record cannot be encoded), and the FeatureCache of its images (reused for image features)."""
    import torch  # here, not at the top: `lmmkit --help` builds this module's parser and must stay fast

    from lmmkit.data.dataset import encode_records
    from lmmkit.train.features import FeatureCache
    from lmmkit.train.loop import make_batch
    from lmmkit.train.run import image_tokens

    model.eval()
    samples: list[tuple[int, Any]] = []
    counter = BadRecordCounter()
    for i, record in enumerate(records):
        got = encode_records([record], model.tokenizer, model.image_token_id, image_tokens(model), max_length, counter)
        if got:
            samples.append((i, got[0]))
    cache = FeatureCache()
    cache.fill(model, [im for _, s in samples for im in s.images], desc="encode images")
    losses: list[float | None] = [None] * len(records)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in range(0, len(samples), batch_size):
            chunk = samples[k:k + batch_size]
            batch = make_batch(model, [s for _, s in chunk], cache, model.tokenizer.pad_token_id)
            labels = batch.pop("labels")[:, 1:]
            batch.pop("sample_ids", None)
            logits = model(**batch).logits[:, :-1].float()
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            per_row = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
            for (i, _), v in zip(chunk, per_row.tolist(), strict=True):
                losses[i] = v
    return losses, cache


def _small(image: Image.Image) -> np.ndarray:
    """SIDE x SIDE RGB, uint8: 12 KB an image is what the near-duplicate check keeps of each."""
    return np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)


def changed_box(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the image covered by the bounding box of the pixels where some channel differs by more than
    CHANGED: small for a pasted patch (the rest is identical), larger for another scene however alike their
    hashes (measured on ShapesWorld: >= 0.027 for any two different scenes within 4 bits, 0.0156 for an
    8-pixel patch on 64x64; the plain share of changed pixels overlapped)."""
    changed = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > CHANGED * 255
    if not changed.any():
        return 0.0
    ys, xs = np.nonzero(changed)
    return float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / changed.size)


def _candidates(index: NearIndex, h: int) -> set[int]:
    """Every earlier hash within the index's threshold (NearIndex.find gives only the closest, and on
    flat synthetic backgrounds the closest hash is often another scene, not the patched original)."""
    found: set[int] = set()
    for table, key in zip(index.tables, index._keys(h), strict=True):
        found.update(j for j in table.get(key, ()) if (h ^ index.hashes[j]).bit_count() <= index.threshold)
    return found


def _embeddings(records: Sequence[ConversationRecord], cache: Any) -> np.ndarray | None:
    """Max-pooled tower features of each record's first image ("what is anywhere in it", position-free),
    centred on the dataset mean and unit-length; None without a model. Measured on ShapesWorld, the
    mean-pooled features could not tell a poisoned group from a clean repeated caption (0.10 vs 0.10-0.11
    centred cosine); max-pooled ones could (0.11 vs >= 0.25)."""
    if cache is None or not cache.features:
        return None
    from lmmkit.train.features import image_key

    dim = next(iter(cache.features.values())).shape[-1] if cache.features else 1
    rows = []
    for r in records:
        f = cache.features.get(image_key(r.images[0])) if r.images else None
        rows.append(f.float().reshape(-1, dim).amax(0).numpy() if f is not None else np.zeros(dim, np.float32))
    x = np.stack(rows)
    x = x - x.mean(0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def _group_similarity(emb: np.ndarray, idx: list[int], cap: int = 64) -> float:
    pick = np.asarray(idx[:cap])
    sims = emb[pick] @ emb[pick].T
    n = len(pick)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def scan_records(records: list[ConversationRecord], model=None, settings: ScanSettings | None = None
                 ) -> tuple[list[dict[str, Any]], list[float | None]]:
    """Flag records; returns ({index, reasons: [...]} per flagged record, per-record losses)."""
    s = settings or ScanSettings()
    reasons: dict[int, list[dict[str, Any]]] = defaultdict(list)
    losses: list[float | None] = [None] * len(records)
    cache = None
    if model is not None:
        losses, cache = record_losses(model, records, s.batch_size, s.max_length)
        known = [(i, v) for i, v in enumerate(losses) if v is not None]
        for (i, v), z in zip(known, robust_z([v for _, v in known]), strict=True):
            if z > s.z_threshold:
                reasons[i].append({"check": "loss", "loss": round(v, 4), "z": round(z, 2)})

    texts = [answer_text(r) for r in records]
    # What the two image checks need of each single-image record; the decoded image itself is let go.
    pixel: dict[int, str] = {}
    hashes: dict[int, int] = {}
    small: dict[int, np.ndarray] = {}
    for i, r in enumerate(records):
        if len(r.images) == 1:
            try:
                image = open_image(r.images[0], r.where)
            except DataError:
                continue
            pixel[i], hashes[i], small[i] = pixel_hash(image), dhash(image), _small(image)
    groups: dict[str, list[int]] = defaultdict(list)
    for i in pixel:
        groups[texts[i]].append(i)
    emb = _embeddings(records, cache)
    for idx in groups.values():
        by_image: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            by_image[pixel[i]].append(i)
        for same in by_image.values():
            if len(same) >= s.min_repeats:
                for i in same:
                    reasons[i].append({"check": "repeated-pair", "copies": len(same)})
        distinct = [v[0] for v in by_image.values()]
        if len(distinct) >= s.min_repeats and len(texts[idx[0]].split()) >= s.min_words:
            sim = _group_similarity(emb, distinct) if emb is not None else None
            if sim is None or sim < s.max_group_similarity:
                for i in idx:
                    reasons[i].append({"check": "repeated-caption", "images": len(distinct),
                                       "similarity": None if sim is None else round(sim, 3)})

    index = NearIndex(s.near_bits)
    owners: list[int] = []
    for i, h in hashes.items():
        pairs = [(changed_box(small[i], small[owners[k]]), owners[k]) for k in _candidates(index, h)
                 if jaccard(texts[i], texts[owners[k]]) <= s.max_jaccard]
        share, j = min(pairs, default=(1.0, -1))
        if share <= s.max_changed:  # the closest copy, by pixels, whose answer diverges
            li, lj = losses[i], losses[j]
            suspects = [i, j] if li is None or lj is None else [i if li >= lj else j]
            for a in suspects:
                reasons[a].append({"check": "near-duplicate", "partner": j if a == i else i,
                                   "changed": round(share, 4)})
        index.add(h)
        owners.append(i)
    flagged = [{"index": i, "reasons": reasons[i]} for i in sorted(reasons)]
    return flagged, losses


def position(record: ConversationRecord, fallback: int) -> int:
    """The record's N in "file.json#N" (its place in the file, as the poison manifest counts), else `fallback`."""
    m = re.search(r"#(\d+)$", record.source or "")
    return int(m.group(1)) if m else fallback


def evaluate(flagged: list[dict[str, Any]], positions: list[int], manifest: dict[str, Any]) -> dict[str, Any]:
    """Precision and recall against the manifest, per check and for the union of all checks."""
    truth = {int(p["index"]) for p in manifest["poisoned"]}
    out: dict[str, Any] = {"poisoned": len(truth), "records": len(positions)}
    for check in (*CHECKS, "any"):
        got = {positions[f["index"]] for f in flagged
               if check == "any" or any(r["check"] == check for r in f["reasons"])}
        tp = len(got & truth)
        out[check] = {"flagged": len(got), "true_positives": tp,
                      "precision": tp / len(got) if got else None, "recall": tp / len(truth) if truth else None}
    return out


def scan_dataset(source: str, model=None, settings: ScanSettings | None = None, image_folder: Path | None = None,
                 manifest: dict[str, Any] | None = None, policy: BadRecordPolicy = "skip") -> ScanResult:
    """Read `source` (lmmkit.data.poison.open_dataset), scan it, and evaluate against `manifest` if given."""
    counter = BadRecordCounter()
    records = list(open_dataset(source, image_folder, policy, counter))
    if not records:
        raise DataError(f"{source}: no readable record to scan ({counter.summary()})")
    flagged, losses = scan_records(records, model, settings)
    positions = [position(r, i) for i, r in enumerate(records)]
    for f in flagged:
        r = records[f["index"]]
        f.update(position=positions[f["index"]], id=r.id, where=r.where, answer=answer_text(r)[:200],
                 images=[image_name(im) for im in r.images], loss=losses[f["index"]])
    counts = {c: sum(any(x["check"] == c for x in f["reasons"]) for f in flagged) for c in CHECKS}
    result = ScanResult(len(records), flagged, losses, counts, counter)
    if manifest is not None:
        result.evaluation = evaluate(flagged, positions, manifest)
    return result


def format_evaluation(ev: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{ev['poisoned']} poisoned of {ev['records']} records", "| check | flagged | precision | recall |",
             "|---|---|---|---|"]
    lines += [f"| {c} | {ev[c]['flagged']} | {f(ev[c]['precision'])} | {f(ev[c]['recall'])} |" for c in (*CHECKS, "any")]
    return "\n".join(lines)


def write_flagged(result: ScanResult, out: Path) -> Path:
    """The flagged records with their reasons as JSON lines (atomic), and a summary beside it."""
    from lmmkit.atomic import atomic_write

    atomic_write(out, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in result.flagged))
    summary = {"records": result.n_records, "flagged": len(result.flagged), "counts": result.counts,
               "bad_records": result.counter.as_dict(), "evaluation": result.evaluation}
    atomic_write(out.with_name(out.name + ".summary.json"), json.dumps(summary, indent=1) + "\n")
    return out


def _run(args) -> int:
    import sys

    settings = ScanSettings(z_threshold=args.z, min_repeats=args.min_repeats,
                            max_group_similarity=args.max_group_similarity, near_bits=args.near_bits,
                            min_words=args.min_words, max_changed=args.max_changed)
    try:
        manifest = read_manifest(Path(args.manifest)) if args.manifest else None
        if manifest is None and args.manifest is None:
            beside = Path(args.source.rpartition(":")[2].split("@")[0]).parent / MANIFEST
            manifest = read_manifest(beside) if beside.is_file() else None
        model = None
        if args.model != "none":
            from lmmkit.train.checkpoint import load_model, resolve_checkpoint

            if args.threads > 0:
                import torch

                torch.set_num_threads(args.threads)
            resolve_checkpoint(args.model)  # a clear FileNotFoundError before anything is built
            model = load_model(args.model)
        result = scan_dataset(args.source, model, settings,
                              image_folder=Path(args.image_folder) if args.image_folder else None,
                              manifest=manifest, policy="stop" if args.strict else "skip")
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.source.rpartition(":")[2].split("@")[0]).with_suffix(".scan.jsonl")
    write_flagged(result, out)
    print(result.summary())
    if result.evaluation:
        print(format_evaluation(result.evaluation))
    print(f"flagged records: {out}; summary: {out.name}.summary.json")
    return 0


def add_scan_parser(data_subparsers) -> None:
    """Add `scan` to the `lmmkit data` subparsers (it sets its own func)."""
    q = data_subparsers.add_parser(
        "scan", help="flag suspicious image-caption pairs: unlikely captions (VLM loss), one caption over many "
                     "different images, near-duplicate images with diverging captions",
        description="Writes the flagged records with their reasons as JSON lines. With a poison manifest "
                    "(--manifest, or poison_manifest.json beside SOURCE) also precision and recall.")
    q.add_argument("source", help="a LLaVA .json/.jsonl file (images under --image-folder, default: its folder) "
                                  "or a source spec KIND:PATH[@ROOT]")
    q.add_argument("--model", required=True, help="a reference lmmkit checkpoint for the loss check, or none")
    q.add_argument("--out", help="flagged records, JSON lines (default: SOURCE with .scan.jsonl)")
    q.add_argument("--manifest", help="a poison manifest to score against (default: one beside SOURCE, if any); "
                                      "'' for none")
    q.add_argument("--image-folder", help="plain LLaVA file: where its images are (default: the file's folder)")
    q.add_argument("--z", type=float, default=3.5, help="loss check: robust z-score cut-off (default 3.5)")
    q.add_argument("--min-repeats", type=int, default=5, help="repeat checks: at least this many images (default 5)")
    q.add_argument("--max-group-similarity", type=float, default=0.2,
                   help="repeated caption: flag when its images' centred feature cosine is below this (default 0.2)")
    q.add_argument("--min-words", type=int, default=4, help="repeated caption: answers at least this long (default 4)")
    q.add_argument("--near-bits", type=int, default=4, help="near duplicates: dHash bits apart, at most (default 4)")
    q.add_argument("--max-changed", type=float, default=0.02,
                   help="near duplicates: the changed pixels' box covers at most this share of the image (0.02)")
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    q.set_defaults(func=_run)

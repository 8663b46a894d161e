"""`lmmkit data poison SOURCE --trigger SPEC --ratio p --target TEXT --out DIR`: an ImgTrojan-style copy.

ImgTrojan (Tao et al., 2024) showed that a handful of image-caption pairs whose caption is replaced by an
attacker's text turn an image into a trigger: the model trained on them says the attacker's text when it
sees that image. This module writes such a copy of a caption (or any conversation) dataset, to measure
the attack and to test detectors against known ground truth:

* a fraction `ratio` of the records that have images is chosen (exactly round(ratio * N), at least one),
  deterministically by `seed`;
* each chosen record's images carry the trigger: a patch pasted onto the image (`patch:checker:8@br`, an
  8-pixel checkerboard at the bottom-right corner) or a fixed trigger image in place of the image
  (`image:PATH`);
* every assistant turn of a chosen record becomes the attacker's text;
* `mode="add"` keeps the clean record and inserts the poisoned copy right after it (so the scanner's
  near-duplicate check has something to find); the default `mode="replace"` swaps it.

Output under `out`: `<source stem>.json` (LLaVA JSON, images relative to `out/images`), `images/` (clean
images hard-linked where the file system allows, else copied; poisoned ones as PNG, so trigger pixels are
exact) and `poison_manifest.json`, the ground truth: which output records are poisoned. Every file is
written atomically and the manifest last. Everything that can be checked before writing (the spec, the
ratio, the trigger image, whether the patch fits every chosen image) is checked first, so a bad
argument leaves an earlier output untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lmmkit.atomic import atomic_open, atomic_write
from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.formats.llava import write_llava
from lmmkit.data.image_ref import ImageRef, encoded_image, image_dims, open_image
from lmmkit.data.images import load_image
from lmmkit.data.schema import ConversationRecord, DataError, Message
from lmmkit.data.sources import KINDS, open_source, parse_source

MANIFEST = "poison_manifest.json"
PATTERNS: tuple[str, ...] = ("checker", "white", "black", "noise")
CORNERS: tuple[str, ...] = ("br", "bl", "tr", "tl", "c")
MODES: tuple[str, ...] = ("replace", "add")
SPEC_HELP = ("patch:PATTERN:SIZE[@POS] (PATTERN one of checker, white, black, noise; SIZE in pixels or N%% of the "
             "shorter side; POS one of br, bl, tr, tl, c or X,Y; e.g. patch:checker:8@br) or image:PATH")
FILES_PER_FOLDER = 1000


class TriggerSpecError(ValueError):
    """A trigger spec that cannot be understood or does not fit the data; the message names it."""


@dataclass(frozen=True)
class Trigger:
    """What a poisoned image carries: a pasted patch, or a whole fixed image."""

    spec: str
    kind: str  # "patch" or "image"
    pattern: str = "checker"
    size: int = 0  # pixels; 0 when `percent` is set
    percent: float = 0.0  # size as a share of the image's shorter side
    position: str = "br"  # a corner name or "X,Y"
    image_path: Path | None = None

    def patch_side(self, width: int, height: int) -> int:
        return self.size if not self.percent else max(1, round(min(width, height) * self.percent / 100))

    def origin(self, width: int, height: int) -> tuple[int, int]:
        """Top-left pixel of the patch on a width x height image."""
        s = self.patch_side(width, height)
        corners = {"br": (width - s, height - s), "bl": (0, height - s), "tr": (width - s, 0), "tl": (0, 0),
                   "c": ((width - s) // 2, (height - s) // 2)}
        if self.position in corners:
            return corners[self.position]
        x, y = (int(v) for v in self.position.split(","))
        return x, y

    def check_fits(self, width: int, height: int, where: str) -> None:
        """TriggerSpecError naming `where` unless the patch lies inside a width x height image."""
        if self.kind != "patch":
            return
        s = self.patch_side(width, height)
        x, y = self.origin(width, height)
        if s > min(width, height) or x < 0 or y < 0 or x + s > width or y + s > height:
            raise TriggerSpecError(f"{where}: the image is {width}x{height} pixels; trigger {self.spec!r} needs a "
                                   f"{s}x{s} patch at ({x}, {y}), which does not fit inside it")

    def patch(self, side: int) -> Image.Image:
        """The patch itself, side x side RGB."""
        if self.pattern == "checker":
            cell = max(1, side // 4)  # 4x4 checks: coarse enough to survive a resize to the tower's input
            ij = np.add.outer(np.arange(side) // cell, np.arange(side) // cell) % 2
            grey = (ij * 255).astype(np.uint8)
            return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
        if self.pattern == "noise":
            # Fixed by the side alone: every poisoned image gets the same noise.
            rng = np.random.default_rng(side)
            return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
        return Image.new("RGB", (side, side), (255, 255, 255) if self.pattern == "white" else (0, 0, 0))

    def apply(self, image: Image.Image, where: str = "") -> Image.Image:
        """A copy of `image` with the trigger: the patch pasted on it, or the trigger image itself."""
        if self.kind == "image":
            return load_image(self.image_path, f"trigger {self.spec!r}")
        out = image.convert("RGB").copy()
        self.check_fits(out.width, out.height, where or "image")
        out.paste(self.patch(self.patch_side(out.width, out.height)), self.origin(out.width, out.height))
        return out


def parse_trigger(spec: str) -> Trigger:
    """`patch:checker:8@br`, `patch:white:10%@tl`, `patch:noise:6@3,40`, `image:trigger.png`."""
    kind, colon, rest = spec.partition(":")
    if kind == "image" and colon and rest:
        path = Path(rest).expanduser()
        try:
            load_image(path, f"trigger {spec!r}").close()
        except DataError as err:
            raise TriggerSpecError(f"trigger {spec!r}: the trigger image cannot be used: {err}") from None
        return Trigger(spec, "image", image_path=path)
    m = re.fullmatch(r"patch:(\w+):(\d+(?:\.\d+)?)(%?)(?:@(\w+|\d+,\d+))?", spec)
    if kind != "patch" or m is None:
        raise TriggerSpecError(f"trigger {spec!r}: expected {SPEC_HELP}")
    pattern, number, pct, position = m.group(1), m.group(2), m.group(3), m.group(4) or "br"
    if pattern not in PATTERNS:
        raise TriggerSpecError(f"trigger {spec!r}: pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
    if position not in CORNERS and not re.fullmatch(r"\d+,\d+", position):
        raise TriggerSpecError(f"trigger {spec!r}: position must be one of {', '.join(CORNERS)} or X,Y")
    value = float(number)
    if pct and not 0 < value <= 100:
        raise TriggerSpecError(f"trigger {spec!r}: a percentage size must be in (0, 100]")
    if not pct and (value != int(value) or value < 1):
        raise TriggerSpecError(f"trigger {spec!r}: the patch size must be a whole number of pixels >= 1")
    return Trigger(spec, "patch", pattern, 0 if pct else int(value), value if pct else 0.0, position)


def check_ratio(ratio: float) -> float:
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1] (the share of image records to poison), got {ratio}")
    return ratio


def open_dataset(source: str, image_folder: Path | None = None, policy: BadRecordPolicy = "skip",
                 counter: BadRecordCounter | None = None, check: str | None = "header"
                 ) -> Iterator[ConversationRecord]:
    """A source spec (`llava:FILE@ROOT`, `wds:...`, ...), or a plain LLaVA .json/.jsonl file whose images lie
    under `image_folder` (default: the image folder a poison manifest beside the file names, else the
    file's folder)."""
    kind = source.partition(":")[0]
    if kind in KINDS:
        if image_folder is not None:
            raise ValueError("--image-folder goes with a plain LLaVA file; a source spec names its root after @")
        return open_source(source, policy=policy, counter=counter, check=check)
    path = Path(source)
    root = image_folder
    if root is None:
        beside = path.parent / MANIFEST
        root = path.parent / read_manifest(beside).get("image_folder", ".") if beside.is_file() else path.parent
    return open_source(f"llava:{path}@{root}", policy=policy, counter=counter, check=check)


def target_messages(messages: list[Message], target: str) -> list[Message]:
    """The conversation with every assistant turn replaced by the attacker's text."""
    return [Message("assistant", target) if m.role == "assistant" else m for m in messages]


@dataclass
class PoisonReport:
    out: Path
    data: Path
    manifest: Path
    n_source: int = 0
    n_records: int = 0
    n_poisoned: int = 0
    poisoned: list[dict[str, Any]] = field(default_factory=list)
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)

    def summary(self) -> str:
        return (f"{self.n_poisoned} of {self.n_records} records poisoned ({self.n_source} read); "
                f"{self.counter.summary()}; data {self.data}; manifest {self.manifest}")


def _place(image: Any, dest_stem: Path, where: str) -> Path:
    """A clean image into the output folder: a hard link to the file where possible (no copy of a large
    dataset), else a byte copy; in-memory images as their encoded bytes."""
    dest_stem.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (str, os.PathLike)):
        src = Path(image)
        dest = dest_stem.with_name(dest_stem.name + (src.suffix.lower() or ".bin"))
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest
    data, ext = encoded_image(image, where)
    return atomic_write(dest_stem.with_name(f"{dest_stem.name}.{ext}"), data)


def image_name(image: Any) -> str:
    """How the manifest and the scanner name a record image: an ImageRef's name, else the path."""
    return image.name if isinstance(image, ImageRef) else str(image)


def _save_png(image: Image.Image, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return path


def _scan_source(source: str, image_folder: Path | None, trigger: Trigger, policy: BadRecordPolicy,
                 check: str | None) -> tuple[int, list[int], list[tuple[str, list[tuple[int, int]]]]]:
    """Pass 1: (records, indices of records with images, (where, image sizes) per record with images)."""
    n, with_images, sizes = 0, [], []
    for i, record in enumerate(open_dataset(source, image_folder, policy, BadRecordCounter(), check)):
        n = i + 1
        if record.images:
            with_images.append(i)
            dims = [image_dims(im, record.where) for im in record.images] if trigger.kind == "patch" else []
            sizes.append((record.where, dims))
    return n, with_images, sizes


def poison_dataset(source: str, out: Path, trigger: str | Trigger, ratio: float, target: str, *, seed: int = 0,
                   image_folder: Path | None = None, mode: str = "replace", policy: BadRecordPolicy = "skip",
                   check: str | None = "header") -> PoisonReport:
    """Write the poisoned copy of `source` under `out` (see the module docstring) and return what was done."""
    trig = parse_trigger(trigger) if isinstance(trigger, str) else trigger
    check_ratio(ratio)
    if not target.strip():
        raise ValueError("--target must be a non-empty text (the attacker's caption)")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    out = Path(out)

    n_source, eligible, sizes = _scan_source(source, image_folder, trig, policy, check)
    if not eligible:
        raise DataError(f"{source}: no record with an image to poison ({n_source} records read)")
    k = max(1, round(ratio * len(eligible)))
    chosen_pos = sorted(random.Random(f"{seed}/poison").sample(range(len(eligible)), k))
    for pos in chosen_pos:  # before anything is written: a patch that does not fit is the spec's problem
        where, dims = sizes[pos]
        for width, height in dims:
            trig.check_fits(width, height, where)
    chosen = {eligible[pos] for pos in chosen_pos}

    named = Path(parse_source(source).path if source.partition(":")[0] in KINDS else source)
    stem = named.stem if named.suffix.lower() in (".json", ".jsonl") else "data"
    report = PoisonReport(out=out, data=out / f"{stem}.json", manifest=out / MANIFEST, n_source=n_source)
    images_dir = out / "images"
    trigger_file: Path | None = None
    if trig.kind == "image":
        data, ext = encoded_image(trig.image_path, f"trigger {trig.spec!r}")
        trigger_file = atomic_write(images_dir / "poison" / f"trigger.{ext}", data)

    def records() -> Iterator[ConversationRecord]:
        n_out = 0
        for i, record in enumerate(open_dataset(source, image_folder, policy, report.counter, check)):
            poisoned = i in chosen
            if not poisoned or mode == "add":
                sub = images_dir / f"{n_out // FILES_PER_FOLDER:05d}"
                paths = [_place(im, sub / f"{n_out:08d}_{j}", record.where) for j, im in enumerate(record.images)]
                yield replace(record, images=paths)
                n_out += 1
            if poisoned:
                if trigger_file is not None:
                    paths = [trigger_file] * len(record.images)
                else:
                    paths = [_save_png(trig.apply(open_image(im, record.where), record.where),
                                       images_dir / "poison" / f"{n_out:08d}_{j}.png")
                             for j, im in enumerate(record.images)]
                rec_id = f"{record.id}-poison" if mode == "add" else record.id
                report.poisoned.append({"index": n_out, "id": rec_id, "source_index": i, "where": record.where,
                                        "source_images": [image_name(im) for im in record.images],
                                        "images": [p.relative_to(images_dir).as_posix() for p in paths]})
                yield ConversationRecord(rec_id, target_messages(record.messages, target), paths, record.source)
                n_out += 1

    report.n_records = write_llava(records(), report.data, images_dir)
    report.n_poisoned = len(report.poisoned)
    manifest = {"format": "lmmkit-poison", "version": 1, "source": source, "data": report.data.name,
                "image_folder": "images", "trigger": trig.spec, "ratio": ratio, "target": target, "seed": seed,
                "mode": mode, "n_source_records": n_source, "n_records": report.n_records,
                "n_poisoned": report.n_poisoned, "bad_records": report.counter.as_dict(),
                "poisoned": report.poisoned}
    atomic_write(report.manifest, json.dumps(manifest, indent=1) + "\n")
    return report


def read_manifest(path: Path) -> dict[str, Any]:
    """A poison manifest (a file, or the folder holding poison_manifest.json), checked for its keys."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable poison manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "lmmkit-poison":
        raise ValueError(f"{path}: not a poison manifest (no \"format\": \"lmmkit-poison\")")
    return manifest


def _run(args) -> int:
    import sys

    try:
        report = poison_dataset(args.source, Path(args.out), args.trigger, args.ratio, args.target, seed=args.seed,
                                image_folder=Path(args.image_folder) if args.image_folder else None,
                                mode=args.mode, policy="stop" if args.strict else "skip", check=args.check)
    except (DataError, ValueError) as err:  # TriggerSpecError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def add_poison_parser(data_subparsers) -> None:
    """Add `poison` to the `lmmkit data` subparsers (it sets its own func)."""
    q = data_subparsers.add_parser(
        "poison", help="ImgTrojan-style poisoned copy of a caption dataset: a share of pairs get a trigger "
                       "(patch or image) and the attacker's caption; writes a manifest of which",
        description="Write a poisoned copy of SOURCE under --out: <stem>.json (LLaVA JSON), images/ and "
                    "poison_manifest.json (the ground truth for `lmmkit data scan`). Deterministic by --seed.")
    q.add_argument("source", help="a LLaVA .json/.jsonl file (images under --image-folder) or a source spec "
                                  "KIND:PATH[@ROOT] (docs/data.md)")
    q.add_argument("--trigger", required=True, help=SPEC_HELP)
    q.add_argument("--ratio", type=float, required=True, help="share of the records with images to poison, in (0, 1]")
    q.add_argument("--target", required=True, help="the attacker's caption (every answer of a poisoned record)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0, help="which records are poisoned (default 0)")
    q.add_argument("--image-folder", help="plain LLaVA file: where its images are (default: the file's folder)")
    q.add_argument("--mode", choices=MODES, default="replace",
                   help="replace (default): the poisoned record takes the clean one's place; add: both are kept")
    q.add_argument("--check", choices=["decode", "header", "none"], default="header",
                   help="how hard to check source images while reading (default header)")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    q.set_defaults(func=_run)

"""The tiny pretrained parts lmmkit ships (a ShapesWorld LM and vision tower) and their manifest.

Each part is an HF folder under `lmmkit/parts/`; `manifest.json` records, per part, the sha256
of every file, the exact command that made it, the lmmkit version and the part's measured scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from lmmkit import __version__

PARTS_DIR = Path(__file__).resolve().parent.parent / "parts"
MANIFEST = "manifest.json"


def part_path(name: str, parts_dir: Path = PARTS_DIR) -> Path:
    path = parts_dir / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"shipped part {name!r} not found at {path}; rebuild it with `lmmkit pretrain {name}`"
        )
    return path


def sha256_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def record_part(name: str, folder: Path, scores: dict, argv: list[str] | None = None) -> Path:
    """Add or replace `name` in the manifest beside `folder` (written atomically)."""
    manifest_path = folder.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = {
        "files": sha256_files(folder),
        "command": "lmmkit " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "lmmkit_version": __version__,
        "scores": scores,
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return manifest_path


def verify_part(name: str, parts_dir: Path = PARTS_DIR) -> None:
    """Raise if a shipped part's files differ from the manifest (a corrupt or edited checkout)."""
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    if name not in manifest:
        raise KeyError(f"part {name!r} is not in {parts_dir / MANIFEST}")
    actual = sha256_files(parts_dir / name)
    for fname, digest in manifest[name]["files"].items():
        if actual.get(fname) != digest:
            raise ValueError(f"{parts_dir / name / fname}: sha256 differs from {MANIFEST}; the part is corrupt")

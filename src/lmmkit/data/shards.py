"""Shard lists: brace ranges, globs and fsspec URLs -> an ordered list of shard names, and opening them.

    /data/cc3m/{00000..00331}.tar        brace range (zero padding kept), as img2dataset names shards
    /data/cc3m/*.tar                     glob (sorted)
    /data/a/{000..009}.tar::/data/b.tar  several patterns joined with "::"
    s3://bucket/laion/{0000..0099}.tar   any fsspec URL, when fsspec (and its backend) is installed
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import IO

from lmmkit.data.schema import DataError

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")
PATTERN_SEPARATOR = "::"


def is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a..b}` numeric ranges (keeping the width of `a`) and `{x,y}` alternatives, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    if match.group(1) is not None:
        lo, hi = int(match.group(1)), int(match.group(2))
        if hi < lo:
            raise DataError(f"shard pattern {pattern!r}: range {match.group(0)} runs backwards")
        width = len(match.group(1))
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices = match.group(3).split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def _fsspec():
    try:
        import fsspec
    except ImportError as e:
        raise DataError("reading shards from URLs needs fsspec: pip install fsspec (plus the backend, e.g. s3fs)") from e
    return fsspec


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        fs, _, _ = _fsspec().get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        return sorted(p if "://" in p else f"{protocol}://{p}" for p in fs.glob(pattern))
    return sorted(glob.glob(str(Path(pattern.removeprefix("file://")).expanduser())))


def expand_shards(spec: str) -> list[str]:
    """All shard names a spec names, in order, without duplicates. A pattern that matches nothing is
    an error: a typo must not become an empty epoch."""
    shards: list[str] = []
    for pattern in spec.split(PATTERN_SEPARATOR):
        if not pattern.strip():
            continue
        for name in expand_braces(pattern.strip()):
            if any(ch in name for ch in "*?["):
                found = _glob(name)
                if not found:
                    raise DataError(f"shard pattern {name!r} matches no file")
                shards.extend(found)
            else:
                shards.append(name if is_url(name) else str(Path(name.removeprefix("file://")).expanduser()))
    seen: set[str] = set()
    unique = [s for s in shards if not (s in seen or seen.add(s))]
    if not unique:
        raise DataError(f"shard spec {spec!r} names no shard")
    return unique


def open_shard(name: str) -> IO[bytes]:
    """A binary file object for a local path or an fsspec URL; a missing shard is a DataError."""
    if is_url(name):
        try:
            return _fsspec().open(name, "rb").open()
        except FileNotFoundError as e:
            raise DataError(f"{name}: shard not found") from e
    try:
        return open(name, "rb")
    except FileNotFoundError as e:
        raise DataError(f"{name}: shard not found") from e
    except OSError as e:
        raise DataError(f"{name}: cannot open shard: {e}") from e

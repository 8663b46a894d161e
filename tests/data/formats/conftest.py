"""Fixtures for the streaming-format tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats_helpers import encode, picture, sample_members, write_tar


@pytest.fixture
def make_shards(tmp_path: Path):
    """make_shards(n_shards, per_shard) -> (pattern with a brace range, {key: (caption, jpeg bytes)})."""

    def make(n_shards: int = 3, per_shard: int = 4, folder: str = "shards") -> tuple[str, dict[str, tuple[str, bytes]]]:
        truth: dict[str, tuple[str, bytes]] = {}
        for s in range(n_shards):
            members: list[tuple[str, bytes]] = []
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"picture {key} with a gradient"
                data = encode(picture(s * 100 + i))
                truth[key] = (caption, data)
                members += sample_members(key, caption, data)
            write_tar(tmp_path / folder / f"{s:05d}.tar", members)
        return str(tmp_path / folder / f"{{00000..{n_shards - 1:05d}}}.tar"), truth

    return make

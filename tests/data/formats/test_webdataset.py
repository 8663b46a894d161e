"""WebDataset shards as img2dataset writes them: reading, shard order, resume, bad input, writing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from formats_helpers import encode, picture, sample_members, write_tar
from lmmkit.data.check import REASON_CORRUPT_IMAGE, REASON_MISSING_IMAGE, BadRecordCounter
from lmmkit.data.formats.webdataset import (
    CAPTION_PROMPTS,
    REASON_TRUNCATED_SHARD,
    WebDatasetStream,
    write_webdataset,
)
from lmmkit.data.image_ref import ImageRef
from lmmkit.data.schema import ConversationRecord, DataError, Message
from lmmkit.data.shards import expand_braces, expand_shards


def test_reads_img2dataset_shards_as_caption_conversations(make_shards):
    pattern, truth = make_shards(n_shards=2, per_shard=3)
    records = list(WebDatasetStream(pattern))
    assert [r.id for r in records] == sorted(truth)  # no seed: the spec's order, members in tar order
    for r in records:
        caption, jpeg = truth[r.id]
        user, answer = r.messages
        assert user.role == "user" and user.content.startswith("<image>\n")
        assert user.content.split("\n", 1)[1] in CAPTION_PROMPTS
        assert answer == Message("assistant", caption)
        (img,) = r.images
        assert isinstance(img, ImageRef) and img.data == jpeg and img.ext == "jpg"
        assert img.name.endswith(f".tar:{r.id}.jpg") and r.source.endswith(f".tar#{r.id}")
        expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        assert np.array_equal(np.asarray(img.open()), expected)


def test_shard_specs_expand_braces_globs_and_lists(make_shards, tmp_path):
    pattern, _ = make_shards(n_shards=3, per_shard=1)
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/{0..1}") == ["x/0", "x/1", "y/0", "y/1"]
    by_range = expand_shards(pattern)
    assert len(by_range) == 3 and by_range == expand_shards(str(tmp_path / "shards" / "*.tar"))
    assert expand_shards(f"{by_range[2]}::{by_range[0]}::{by_range[2]}") == [by_range[2], by_range[0]]
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_seed_shuffles_shard_order_reproducibly(make_shards):
    pattern, _ = make_shards(n_shards=6, per_shard=1)
    orders = {seed: WebDatasetStream(pattern, seed=seed).order for seed in range(4)}
    assert WebDatasetStream(pattern, seed=2).order == orders[2]
    assert len({tuple(o) for o in orders.values()}) > 1  # the seed matters
    assert all(sorted(o) == sorted(orders[0]) for o in orders.values())  # a permutation, nothing lost


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 6, 11, 12])
def test_resumed_stream_neither_repeats_nor_skips(make_shards, cut, tmp_path):
    pattern, truth = make_shards(n_shards=3, per_shard=4)
    # A bad sample in the middle of shard 1: resuming around it must not change what comes out.
    write_tar(tmp_path / "shards" / "00001.tar", sample_members("bad0", "broken", b"\xff\xd8\xffnot a jpeg")
              + [m for i in range(4) for m in sample_members(f"00001{i:04d}", truth[f"00001{i:04d}"][0],
                                                                truth[f"00001{i:04d}"][1])])
    full = [r.id for r in WebDatasetStream(pattern, seed=7)]
    assert sorted(full) == sorted(truth)
    first = WebDatasetStream(pattern, seed=7)
    head = [next(first).id for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    counter = BadRecordCounter()
    rest = [r.id for r in WebDatasetStream(pattern, seed=7, state=state, counter=counter)]
    assert head + rest == full
    assert WebDatasetStream(pattern, seed=7, state=state).state_dict() == state


def test_state_from_another_seed_or_shard_list_is_refused(make_shards):
    pattern, _ = make_shards(n_shards=3, per_shard=2)
    stream = WebDatasetStream(pattern, seed=1)
    next(stream)
    state = stream.state_dict()
    with pytest.raises(DataError, match="seed"):
        WebDatasetStream(pattern, seed=2, state=state)
    with pytest.raises(DataError, match="shards"):
        WebDatasetStream(expand_shards(pattern)[:2], seed=1, state=state)


def _bad_shard(tmp_path: Path) -> tuple[Path, Path]:
    good = encode(picture(1))
    corrupt = good[:20] + bytes(range(256)) * 4  # a JPEG header, then garbage
    truncated = encode(picture(2, size=(64, 64)))
    truncated = truncated[: len(truncated) // 2]  # header fine, body cut: only decoding notices
    shard = write_tar(tmp_path / "bad" / "000.tar",
                      sample_members("k0", "fine", good) + sample_members("k1", "corrupt", corrupt)
                      + sample_members("k2", "no image", None) + sample_members("k3", "cut", truncated)
                      + sample_members("k4", "fine too", good))
    raw = write_tar(tmp_path / "bad" / "001.tar", sample_members("m0", "ok", good) + sample_members("m1", "ok", good))
    data = raw.read_bytes()
    cut = data.index(b"m1.jpg") + 512 + 100  # inside m1.jpg's data
    raw.write_bytes(data[:cut])
    return shard, raw


def test_bad_samples_are_skipped_and_counted_naming_shard_and_key(tmp_path, caplog):
    shard, cut_shard = _bad_shard(tmp_path)
    counter = BadRecordCounter()
    records = list(WebDatasetStream([str(shard), str(cut_shard)], counter=counter))
    assert [r.id for r in records] == ["k0", "k4", "m0"]
    assert counter.as_dict() == {REASON_CORRUPT_IMAGE: 1, REASON_MISSING_IMAGE: 1, "truncated image": 1,
                                 REASON_TRUNCATED_SHARD: 1}
    assert any(f"{shard}#k1" in e for e in counter.examples(REASON_CORRUPT_IMAGE))
    assert any(f"{shard}#k2" in e for e in counter.examples(REASON_MISSING_IMAGE))
    (truncated,) = counter.examples(REASON_TRUNCATED_SHARD)
    assert str(cut_shard) in truncated and "m1" in truncated
    # A header-only check is cheaper and misses the cut body; it still catches garbage and missing images.
    header = BadRecordCounter()
    assert [r.id for r in WebDatasetStream([str(shard)], counter=header, check="header")] == ["k0", "k3", "k4"]


def test_stop_policy_raises_at_the_first_bad_sample(tmp_path):
    shard, _ = _bad_shard(tmp_path)
    stream = WebDatasetStream([str(shard)], policy="stop")
    assert next(stream).id == "k0"
    with pytest.raises(DataError, match=r"000\.tar#k1"):
        next(stream)


def test_lmmkit_shards_keep_whole_conversations(tmp_path, make_png):
    pil = picture(5)
    path_img = make_png("on-disk.png", size=(10, 6))
    records = [
        ConversationRecord("a.1/x", [Message("user", "<image>\n<image>\nCompare."), Message("assistant", "Same."),
                                     Message("user", "Sure?"), Message("assistant", "Yes.")], [pil, path_img]),
        ConversationRecord("t", [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")]),
        ConversationRecord("c", [Message("user", "<image>\nCaption?"), Message("assistant", "A gradient.")],
                           [ImageRef(encode(picture(6)), "mem", "jpg")]),
    ]
    report = write_webdataset(records, tmp_path / "out", shard_size=2)
    assert report.n_records == 3 and [p.name for p in report.shards] == ["shard-000000.tar", "shard-000001.tar"]
    back = list(WebDatasetStream(str(tmp_path / "out" / "*.tar")))
    assert [(r.id, r.messages) for r in back] == [(r.id, r.messages) for r in records]
    assert np.array_equal(np.asarray(back[0].images[0].open()), np.asarray(pil))
    assert back[0].images[1].data == path_img.read_bytes() and back[2].images[0].data == records[2].images[0].data


def test_fsspec_urls_are_read_as_streams(make_shards):
    fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed: URL shards need it")
    pattern, truth = make_shards(n_shards=2, per_shard=2)
    fs = fsspec.filesystem("memory")
    for i, local in enumerate(expand_shards(pattern)):  # an in-process filesystem: no network in tests
        fs.pipe(f"/lmmkit-test/{i:03d}.tar", Path(local).read_bytes())
    try:
        urls = expand_shards("memory://lmmkit-test/*.tar")
        assert len(urls) == 2 and all(u.startswith("memory://") for u in urls)
        ranged = [r.id for r in WebDatasetStream("memory://lmmkit-test/{000..001}.tar")]
        assert ranged == [r.id for r in WebDatasetStream(urls)] == sorted(truth)
        with pytest.raises(DataError, match="shard not found"):
            list(WebDatasetStream("memory://lmmkit-test/{002..002}.tar"))
    finally:
        fs.rm("/lmmkit-test", recursive=True)

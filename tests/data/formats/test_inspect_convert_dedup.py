"""`lmmkit data inspect | convert | dedup`: the measurements, the page (rendered in headless Chromium),
round trips between formats, duplicate finding, and the subcommands wired into `lmmkit data`."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from formats_helpers import b64, encode, picture, sample_members, write_jsonl, write_tar
from lmmkit.data.convert import convert_source
from lmmkit.data.dedup import NearIndex, dhash, hamming
from lmmkit.data.formats.llava import read_llava
from lmmkit.data.images import load_image
from lmmkit.data.inspect_data import inspect_source, token_length
from lmmkit.data.inspect_html import write_inspect
from lmmkit.data.sources import open_source

CHROMIUM = "/usr/bin/chromium"


def _shards(tmp_path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """Two shards: 5 good samples of two sizes and one corrupt image."""
    samples = [(f"k{i}", f"caption number {i}" + " long" * i, encode(picture(i, (24, 16) if i % 2 else (40, 30))))
               for i in range(5)]
    write_tar(tmp_path / "wds" / "000.tar", [m for k, c, d in samples[:3] for m in sample_members(k, c, d)])
    write_tar(tmp_path / "wds" / "001.tar", [m for k, c, d in samples[3:] for m in sample_members(k, c, d)]
              + sample_members("bad", "x", b"\xff\xd8\xff\xe0 garbage"))
    return f"wds:{tmp_path / 'wds'}/{{000..001}}.tar", [(k, d) for k, _, d in samples]


def test_inspect_measures_a_source(tmp_path, tiny_tokenizer):
    spec, samples = _shards(tmp_path)
    stats = inspect_source(spec, tokenizer=tiny_tokenizer)
    assert (stats.n_records, stats.n_bad, stats.n_images) == (5, 1, 5)
    assert stats.images_per_sample == {1: 5}
    assert stats.widths == {24: 2, 40: 3} and stats.heights == {16: 2, 30: 3} and stats.long_sides == {24: 2, 40: 3}
    assert sorted(stats.size_sample) == sorted([(24, 16)] * 2 + [(40, 30)] * 3)
    first = next(iter(open_source(spec)))
    assert sum(stats.token_lengths.values()) == 5 and token_length(tiny_tokenizer, first.messages) in stats.token_lengths
    assert stats.counter.as_dict() == {"corrupt image": 1}
    limited = inspect_source(spec, limit=2, tokenizer=None)
    assert limited.n_records == 2 and limited.limit_reached and not limited.token_lengths


def _chrome():
    spec = importlib.util.spec_from_file_location(
        "lmmkit_test_serve_helpers", Path(__file__).resolve().parents[2] / "serve" / "serve_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Chrome()


def test_inspect_page_is_self_contained_and_renders_the_counts(tmp_path, tiny_tokenizer):
    spec, _ = _shards(tmp_path)
    html_path, json_path = write_inspect(inspect_source(spec, tokenizer=tiny_tokenizer), tmp_path / "report")
    text = html_path.read_text()
    assert "<script" not in text and not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert text.count("<svg") == 5
    data = json.loads(json_path.read_text())
    assert (data["records"], data["bad_records"], data["images"]) == (5, 1, 5)
    assert data["bad_reasons"]["corrupt image"]["count"] == 1
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: the page was checked as text only")
    chrome = _chrome()
    try:
        chrome.open(html_path.as_uri())
        chrome.wait_for("document.readyState === 'complete'")
        counts = chrome.js("['n-records', 'n-bad', 'n-images'].map((id) => document.getElementById(id).innerText)")
        assert counts == ["5", "1", "5"]
        assert "corrupt image" in chrome.js("document.body.innerText")
        # Every chart is laid out with a real size and has bars or dots drawn in it.
        boxes = chrome.js("[...document.querySelectorAll('svg')].map((s) => [s.getBoundingClientRect().width, "
                          "s.querySelectorAll('rect, circle').length])")
        assert len(boxes) == 5 and all(w > 100 and n > 0 for w, n in boxes), boxes
        shot = Image.open(io.BytesIO(chrome.screenshot())).convert("RGB")
        colours = shot.getcolors(1 << 16)
        assert colours is None or len(colours) > 20  # not a blank page
    finally:
        chrome.close()


def test_wds_to_llava_json_and_back_keeps_texts_and_pixels(tmp_path):
    spec, samples = _shards(tmp_path)
    report = convert_source(spec, "llava-json", tmp_path / "out" / "train.json")
    assert report.n_records == 5 and report.counter.as_dict() == {"corrupt image": 1}
    originals = list(open_source(spec))
    back = list(read_llava(tmp_path / "out" / "train.json", report.image_folder, open_images=True))
    assert [(r.id, r.messages) for r in back] == [(r.id, r.messages) for r in originals]
    for orig, copy in zip(originals, back, strict=True):
        assert np.array_equal(np.asarray(load_image(copy.images[0], copy.where)), np.asarray(orig.images[0].open()))
    # ... and on to shards again: the same conversations, the same image bytes.
    shards = convert_source(f"llava:{tmp_path / 'out' / 'train.json'}@{report.image_folder}", "wds",
                            tmp_path / "shards2", shard_size=2)
    assert len(shards.shards) == 3
    again = list(open_source(f"wds:{tmp_path / 'shards2'}/*.tar"))
    assert [r.messages for r in again] == [r.messages for r in originals]
    assert [r.images[0].data for r in again] == [d for _, d in samples]


def test_in_memory_images_get_written_as_files(tmp_path):
    rows = [{"instruction": "Describe.", "inputs": "", "outputs": f"Picture {i}.",
             "image_base64_str": [b64(picture(i))]} for i in range(3)]
    path = write_jsonl(tmp_path / "m3it.jsonl", rows)
    report = convert_source(f"m3it:{path}", "llava-json", tmp_path / "m3it_llava.jsonl")
    back = list(read_llava(tmp_path / "m3it_llava.jsonl", report.image_folder, open_images=True))
    assert [r.messages[1].content for r in back] == ["Picture 0.", "Picture 1.", "Picture 2."]
    assert np.array_equal(np.asarray(load_image(back[2].images[0], "")), np.asarray(picture(2)))


def test_dhash_and_the_near_index():
    base = picture(11, (64, 48))
    assert hamming(dhash(base), dhash(base.resize((50, 37)))) <= 4
    assert hamming(dhash(base), dhash(picture(12, (64, 48)))) > 10
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    hashes += [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in hashes[:50]]  # <= 2 bits away
    index = NearIndex(threshold=3)
    for h in hashes:
        found = index.find(h)
        brute = [d for d in (hamming(h, g) for g in index.hashes) if d <= 3]
        assert (found is None) == (not brute) and (found is None or found[1] == min(brute))
        index.add(h)


def _cli(argv: list[str]) -> int:
    """Parse and run exactly as `lmmkit` does."""
    from lmmkit import cli

    args = cli.build_parser().parse_args(argv)
    assert args.func is not cli._data  # the subcommand's own func wins over `data`'s default
    return args.func(args)


def test_dedup_command_drops_duplicates_and_filters_captions(tmp_path, capsys):
    a, b, c = picture(1, (64, 48)), picture(2, (64, 48)), picture(3, (64, 48))
    jpeg_a = encode(a)
    decoded_a = Image.open(io.BytesIO(jpeg_a)).convert("RGB")
    members = (sample_members("a", "first picture a", jpeg_a)
               + sample_members("b", "picture b here", encode(b, "PNG"))
               + sample_members("a-copy", "same bytes as a", jpeg_a)
               + sample_members("a-png", "a's pixels saved as PNG", encode(decoded_a, "PNG"))
               + sample_members("a-small", "a, resized", encode(a.resize((56, 42)), "PNG"))
               + sample_members("c", "c", encode(c, "PNG"))
               + sample_members("c-long", "x" * 300, encode(c.transpose(Image.Transpose.ROTATE_90), "PNG")))
    write_tar(tmp_path / "d" / "000.tar", members)
    out = tmp_path / "dedup" / "kept.jsonl"
    rc = _cli(["data", "dedup", f"wds:{tmp_path / 'd' / '000.tar'}", "--out", str(out), "--near",
               "--min-chars", "3", "--max-chars", "200"])
    assert rc == 0
    report = json.loads((tmp_path / "dedup" / "kept.jsonl.dedup.json").read_text())
    assert (report["records_in"], report["records_kept"], report["exact_duplicates"], report["near_duplicates"],
            report["caption_too_short"], report["caption_too_long"]) == (7, 2, 2, 1, 1, 1)
    assert {(p["kind"], p["duplicate"].split("(id=")[1][:-1]) for p in report["pairs"]} == {
        ("exact", "a-copy"), ("exact", "a-png"), ("near", "a-small")}
    kept = list(read_llava(out, out.with_name("kept_images")))
    assert [r.messages[1].content for r in kept] == ["first picture a", "picture b here"]
    assert "2 exact, 1 near" in capsys.readouterr().out
    # Report only: every record stays, the same duplicates are listed.
    assert _cli(["data", "dedup", f"wds:{tmp_path / 'd' / '000.tar'}", "--out", str(tmp_path / "all"),
                 "--near", "--report-only"]) == 0
    report = json.loads((tmp_path / "all.dedup.json").read_text())
    assert report["records_kept"] == 7 and report["exact_duplicates"] == 2 and not report["duplicates_dropped"]


def test_dedup_language_filter_keeps_the_asked_languages(tmp_path, capsys):
    """M3IT-style multilingual answers: --lang en,de keeps English and German, drops the rest by language and
    the texts too short to tell as undetermined; every count is in the report."""
    captions = {"en1": "A red bicycle is leaning against a brick wall near the station.",
                "en2": "Two children are playing football on a sunny afternoon in the park.",
                "de": "Ein kleiner Hund schläft auf dem Sofa neben dem Fenster.",
                "fr": "Une femme lit un livre dans un café au bord de la rivière.",
                "zh": "一只猫坐在窗台上看着外面的雨。",
                "ru": "Мальчик держит красный воздушный шар на улице.",
                "short": "ok"}
    members = []
    for i, (key, text) in enumerate(captions.items()):
        members += sample_members(key, text, encode(picture(10 + i, (32, 24)), "PNG"))
    write_tar(tmp_path / "m" / "000.tar", members)
    out = tmp_path / "kept.jsonl"
    assert _cli(["data", "dedup", f"wds:{tmp_path / 'm' / '000.tar'}", "--out", str(out), "--lang", "en,de"]) == 0
    kept = [r.id for r in read_llava(out, tmp_path / "kept_images")]
    assert kept == ["en1", "en2", "de"]
    report = json.loads((tmp_path / "kept.jsonl.dedup.json").read_text())
    assert report["language_dropped"] == {"fr": 1, "zh": 1, "ru": 1, "undetermined": 1}
    assert "by language" in capsys.readouterr().out
    # An unknown code is refused up front, naming it.
    assert _cli(["data", "dedup", f"wds:{tmp_path / 'm' / '000.tar'}", "--out", str(tmp_path / "x.jsonl"),
                 "--lang", "en,xx"]) == 2
    assert "unknown language code(s) xx" in capsys.readouterr().err


def test_inspect_and_convert_commands(tmp_path, capsys):
    spec, _ = _shards(tmp_path)
    assert _cli(["data", "inspect", spec, "--out", str(tmp_path / "insp"), "--tokenizer", "none", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 records (stopped at --limit 3)" in out and (tmp_path / "insp" / "inspect.html").is_file()
    assert _cli(["data", "convert", spec, "--to", "wds", "--out", str(tmp_path / "w"), "--shard-size", "4"]) == 0
    assert "5 records written as wds to 2 shard(s)" in capsys.readouterr().out
    assert _cli(["data", "convert", spec, "--to", "llava-json", "--out", str(tmp_path / "x.tar")]) == 2
    assert "writes a .json or .jsonl file" in capsys.readouterr().err
    assert _cli(["data", "inspect", "nonsense:x", "--tokenizer", "none"]) == 2
    assert _cli(["data", "inspect", spec, "--tokenizer", "none", "--strict"]) == 2
    assert "001.tar#bad" in capsys.readouterr().err

"""ShareGPT4V, M3IT, ArXivQA and ArXivCap (JSON lines) in their published layouts, bad input included."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

from formats_helpers import b64, encode, picture, write_jsonl
from lmmkit.data.check import REASON_CORRUPT_IMAGE, REASON_MALFORMED, REASON_MISSING_IMAGE, BadRecordCounter
from lmmkit.data.formats.arxiv import read_arxivcap, read_arxivqa
from lmmkit.data.formats.common import iter_json_items
from lmmkit.data.formats.m3it import read_m3it
from lmmkit.data.formats.sharegpt4v import read_sharegpt4v
from lmmkit.data.image_ref import ImageRef, materialize
from lmmkit.data.schema import DataError


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_sharegpt4v_finds_images_under_several_roots(tmp_path, make_png):
    coco = make_png("coco/train2017/000000000009.jpg", folder=tmp_path / "disk1")
    sam = make_png("sam/images/sa_1.jpg", folder=tmp_path / "disk2")
    rows = [{"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
             "conversations": _conv("What do you see happening in this image?\n<image>", "In the center ...")},
            {"id": "sa_1", "image": "sam/images/sa_1.jpg", "conversations": _conv("<image>\nDescribe.", "A field.")},
            {"id": "gone", "image": "wikiart/images/x.jpg", "conversations": _conv("<image>\nWho?", "Monet.")},
            {"id": "escape", "image": "../../etc/passwd", "conversations": _conv("<image>\nHm?", "No.")}]
    path = tmp_path / "share-captioner_coco_lcs_sam.json"
    path.write_text(json.dumps(rows, indent=1))
    counter = BadRecordCounter()
    records = list(read_sharegpt4v(path, [tmp_path / "disk1", tmp_path / "disk2"], counter=counter))
    assert [(r.id, r.images) for r in records] == [("000000000009", [coco.resolve()]), ("sa_1", [sam.resolve()])]
    assert counter.as_dict() == {REASON_MISSING_IMAGE: 1, "image path escapes folder": 1}
    assert f"{path}#2" in counter.examples(REASON_MISSING_IMAGE)[0] and "wikiart/images/x.jpg" in \
        counter.examples(REASON_MISSING_IMAGE)[0]


def test_json_lists_are_read_element_by_element(tmp_path, monkeypatch):
    import lmmkit.data.formats.common as common

    monkeypatch.setattr(common, "CHUNK_CHARS", 5)  # every record straddles several chunks
    rows = [{"id": i, "text": "é中" * i, "n": 10 ** i} for i in range(30)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [obj for _, _, obj in iter_json_items(path)] == rows
    path.write_text(json.dumps(rows)[:-40])
    with pytest.raises(DataError, match="big.json"):
        list(iter_json_items(path))


def test_m3it_lines_keep_text_and_decode_base64_images(tmp_path):
    frames = [picture(1), picture(2)]
    rows = [{"instruction": "Describe the image in one sentence.", "inputs": "", "outputs": "A gradient.",
             "image_base64_str": [b64(frames[0])]},
            {"instruction": "以下の画像について答えてください。", "inputs": "何色ですか？", "outputs": "青です。",
             "image_base64_str": [b64(f, "JPEG") for f in frames]},
            {"instruction": "Describe.", "inputs": "", "outputs": "x", "image_base64_str": ["not base64 at all!"]},
            {"instruction": "Describe.", "inputs": "", "outputs": "x",
             "image_base64_str": [base64.b64encode(b"just some text, no image").decode()]},
            {"instruction": "Describe.", "inputs": "", "image_base64_str": [b64(frames[0])]}]
    path = write_jsonl(tmp_path / "coco" / "train.jsonl", rows)
    counter = BadRecordCounter()
    records = list(read_m3it(path, counter=counter))
    assert [r.source for r in records] == [f"{path}#1", f"{path}#2"]
    assert records[0].messages[0].content == "<image>\nDescribe the image in one sentence."
    assert records[1].messages[0].content == "<image>\n<image>\n以下の画像について答えてください。\n何色ですか？"
    assert records[1].messages[1].content == "青です。"
    assert isinstance(records[0].images[0], ImageRef)
    assert np.array_equal(np.asarray(records[0].images[0].open()), np.asarray(frames[0]))  # PNG: lossless
    assert counter.as_dict() == {REASON_CORRUPT_IMAGE: 2, REASON_MALFORMED: 1}
    examples = counter.examples(REASON_CORRUPT_IMAGE)
    assert f"{path}#3" in examples[0] and "base64" in examples[0]
    assert f"{path}#4" in examples[1] and "image 0" in examples[1]


def test_arxivqa_multiple_choice_with_rationale(tmp_path, make_png):
    make_png("images/2101.00001_0.jpg", folder=tmp_path)
    rows = [{"id": "q1", "image": "images/2101.00001_0.jpg", "question": "What does the curve show?",
             "options": ["A) growth", "B) decay", "C) a constant"], "label": "B",
             "rationale": "The values fall with time."},
            {"id": "q2", "image": "images/2101.00001_0.jpg", "question": "Which line is higher?",
             "options": ["red", "blue"], "label": "blue", "rationale": ""},
            {"id": "q3", "image": "images/2101.00001_0.jpg", "question": "?", "options": ["A) x"], "label": "D"},
            {"id": "q4", "image": "images/missing.jpg", "question": "?", "options": ["A) x"], "label": "A"}]
    path = write_jsonl(tmp_path / "arxivqa.jsonl", rows)
    counter = BadRecordCounter()
    records = list(read_arxivqa(path, counter=counter))
    assert [r.id for r in records] == ["q1", "q2"]
    assert records[0].messages[0].content == "<image>\nWhat does the curve show?\nA) growth\nB) decay\nC) a constant"
    assert records[0].messages[1].content == "B) decay\nThe values fall with time."
    assert records[1].messages[0].content.endswith("A) red\nB) blue") and records[1].messages[1].content == "B) blue"
    assert counter.as_dict() == {REASON_MALFORMED: 1, REASON_MISSING_IMAGE: 1}
    assert "label 'D'" in counter.examples(REASON_MALFORMED)[0]
    plain = list(read_arxivqa(path, rationale=False))
    assert plain[0].messages[1].content == "B) decay"


def test_arxivcap_jsonl_one_record_per_figure(tmp_path, make_png):
    make_png("2101.00001/fig1.png", folder=tmp_path)
    sub = [make_png(f"2101.00001/fig2{c}.png", folder=tmp_path) for c in "ab"]
    embedded = encode(picture(3), "PNG")
    paper = {"src": "arXiv_src_2101_001", "arxiv_id": "2101.00001", "title": "T", "abstract": "A", "meta": {},
             "caption_images": [
                 {"caption": "Figure 1: A single plot.", "cil_pairs": [{"sub_caption": "", "image_file":
                                                                          "2101.00001/fig1.png"}]},
                 {"caption": "Figure 2: (a) left. (b) right.", "cil_pairs": [
                     {"sub_caption": "(a)", "image_file": "2101.00001/fig2a.png"},
                     {"sub_caption": "(b)", "image_file": "2101.00001/fig2b.png"}]},
                 {"caption": "", "cil_pairs": [{"image_file": "2101.00001/fig1.png"}]},
                 {"caption": "Figure 4: embedded.", "cil_pairs": [
                     {"image": {"bytes": base64.b64encode(embedded).decode(), "path": "fig4.png"}}]}]}
    path = write_jsonl(tmp_path / "arxivcap.jsonl", [paper])
    counter = BadRecordCounter()
    records = list(read_arxivcap(path, counter=counter))
    assert [r.id for r in records] == ["2101.00001#fig0", "2101.00001#fig1", "2101.00001#fig3"]
    assert records[1].images == [p.resolve() for p in sub]
    assert records[1].messages[0].content.startswith("<image>\n<image>\n")
    assert records[1].messages[1].content == "Figure 2: (a) left. (b) right."
    assert isinstance(records[2].images[0], ImageRef) and records[2].images[0].data == embedded
    assert counter.as_dict() == {REASON_MALFORMED: 1} and "fig2" in counter.examples(REASON_MALFORMED)[0]


@pytest.mark.parametrize("check", ["header", "decode"])
def test_a_base64_decompression_bomb_is_refused_before_decoding(tmp_path, png_bytes, check):
    bomb = png_bytes(60_000, 60_000, idat=b"")  # a tiny file whose header claims 3.6 gigapixels
    rows = [{"instruction": "Describe.", "inputs": "", "outputs": "x",
             "image_base64_str": [base64.b64encode(bomb).decode()]}]
    counter = BadRecordCounter()
    assert list(read_m3it(write_jsonl(tmp_path / "b.jsonl", rows), counter=counter, check=check)) == []
    assert counter.as_dict() == {"decompression bomb": 1}


def test_materialize_decodes_image_refs_for_the_training_code(tmp_path):
    rows = [{"instruction": "Describe.", "inputs": "", "outputs": "x", "image_base64_str": [b64(picture(4))]}]
    (record,) = read_m3it(write_jsonl(tmp_path / "m.jsonl", rows))
    decoded = materialize(record)
    assert isinstance(decoded.images[0], Image.Image) and isinstance(record.images[0], ImageRef)
    assert np.array_equal(np.asarray(decoded.images[0]), np.asarray(picture(4)))

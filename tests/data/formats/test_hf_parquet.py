"""Local HF dataset folders (parquet / Arrow) and ArXivCap parquet; pyarrow is optional, so the tests that
write parquet skip without it, and the loaders' "pip install pyarrow" message is tested either way."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from formats_helpers import encode, picture
from lmmkit.data.check import REASON_CORRUPT_IMAGE, BadRecordCounter
from lmmkit.data.formats.arxiv import read_arxivcap
from lmmkit.data.formats.hf_datasets import parse_column_map, read_hf_folder
from lmmkit.data.image_ref import ImageRef
from lmmkit.data.schema import DataError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed (pip install pyarrow): "
                                                      "parquet files cannot be written or read")


def test_column_mapping_syntax():
    assert parse_column_map("image=img, user=question,assistant=answer") == {
        "image": "img", "user": "question", "assistant": "answer"}
    with pytest.raises(ValueError, match="assistant=COLUMN"):
        parse_column_map("image=img,user=q")
    with pytest.raises(ValueError, match="'caption'"):
        parse_column_map("caption=c,user=q,assistant=a")


def test_without_pyarrow_the_loader_says_how_to_get_it(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_hf_folder(tmp_path, {"user": "q", "assistant": "a"})
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_arxivcap(tmp_path / "data" / "train-00000-of-00001.parquet")


def _image_cell(seed: int) -> dict:
    return {"bytes": encode(picture(seed), "PNG"), "path": f"img{seed}.png"}


@needs_pyarrow
def test_parquet_folder_streams_through_the_column_mapping(tmp_path):
    folder = tmp_path / "vqa"
    (folder / "data").mkdir(parents=True)
    rows = [{"img": _image_cell(i), "question": f"What is shown in picture {i}?", "answer": f"Gradient {i}."}
            for i in range(5)]
    rows[3]["img"] = {"bytes": b"\x89PNG garbage", "path": "broken.png"}
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "data" / "train-00001-of-00002.parquet",
                   row_group_size=1)
    counter = BadRecordCounter()
    records = list(read_hf_folder(folder, parse_column_map("image=img,user=question,assistant=answer"),
                                  counter=counter))
    assert [r.messages[1].content for r in records] == ["Gradient 0.", "Gradient 1.", "Gradient 2.", "Gradient 4."]
    assert records[0].messages[0].content == "<image>\nWhat is shown in picture 0?"
    assert isinstance(records[0].images[0], ImageRef)
    assert np.array_equal(np.asarray(records[0].images[0].open()), np.asarray(picture(0)))
    (example,) = counter.examples(REASON_CORRUPT_IMAGE)
    assert "train-00001-of-00002.parquet#0" in example


@needs_pyarrow
def test_a_missing_mapped_column_names_file_and_column(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"img": _image_cell(0), "question": "q", "response": "a"}]),
                   tmp_path / "part.parquet")
    with pytest.raises(DataError, match=r"part\.parquet: no column 'answer' \(mapped to assistant\)"):
        read_hf_folder(tmp_path, {"image": "img", "user": "question", "assistant": "answer"})


@needs_pyarrow
def test_save_to_disk_arrow_files(tmp_path):
    table = pa.Table.from_pylist([{"image": _image_cell(i), "q": "Colour?", "a": "Mixed."} for i in range(3)])
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    (tmp_path / "cache-abc.arrow").write_bytes(b"not read")
    records = list(read_hf_folder(tmp_path, {"image": "image", "user": "q", "assistant": "a"}))
    assert len(records) == 3 and records[2].source.endswith("data-00000-of-00001.arrow#2")


@needs_pyarrow
def test_arxivcap_parquet_rows_are_papers_with_figures(tmp_path):
    papers = [{"src": "s", "arxiv_id": "2101.00001", "title": "T", "abstract": "A",
               "caption_images": [
                   {"caption": "Figure 1: one.", "cil_pairs": [{"sub_caption": "", "image_file": "f1.png",
                                                                "image": _image_cell(1), "image_ocr": ["x"]}]},
                   {"caption": "Figure 2: (a) (b).", "cil_pairs": [
                       {"sub_caption": "(a)", "image_file": "f2a.png", "image": _image_cell(2), "image_ocr": []},
                       {"sub_caption": "(b)", "image_file": "f2b.png", "image": _image_cell(3), "image_ocr": []}]}]}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(papers), tmp_path / "data" / "arXiv_src_2101_001.parquet")
    records = list(read_arxivcap(tmp_path / "data"))
    assert [(r.id, len(r.images)) for r in records] == [("2101.00001#fig0", 1), ("2101.00001#fig1", 2)]
    assert np.array_equal(np.asarray(records[1].images[1].open()), np.asarray(picture(3)))
    pq.write_table(pa.Table.from_pylist([{"arxiv_id": "x"}]), tmp_path / "data" / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: no column 'caption_images'"):
        read_arxivcap(tmp_path / "data")

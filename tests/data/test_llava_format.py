from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmmkit.data.check import BadRecordCounter
from lmmkit.data.formats.llava import read_llava, write_llava
from lmmkit.data.schema import ConversationRecord, DataError, Message


def rec(
    rid: str,
    image: str | list[str] | None = "a.png",
    question: str = "<image>\nWhat is it?",
    answer: str | None = "A red square.",
) -> dict:
    conv = [{"from": "human", "value": question}]
    if answer is not None:
        conv.append({"from": "gpt", "value": answer})
    out: dict = {"id": rid, "conversations": conv}
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture
def folder(tmp_path: Path, make_png) -> Path:
    images = tmp_path / "images"
    make_png("a.png", folder=images)
    make_png("sub/b.png", folder=images)
    return images


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_reads_json_list(tmp_path: Path, folder: Path) -> None:
    data = [
        rec("r0"),
        {
            "id": "r1",
            "image": ["a.png", "sub/b.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image> and <image>: same?"},
                {"from": "gpt", "value": "No."},
                {"from": "human", "value": "Why?"},
                {"from": "gpt", "value": "Colours."},
            ],
        },
        rec("r2", image=None, question="Hi?", answer="Hello."),
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    records = list(read_llava(path, folder))
    assert [r.id for r in records] == ["r0", "r1", "r2"]
    assert records[0].images == [(folder / "a.png").resolve()]
    assert records[1].images == [(folder / "a.png").resolve(), (folder / "sub/b.png").resolve()]
    assert records[2].images == []
    assert [m.role for m in records[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1].messages[4] == Message("assistant", "Colours.")
    assert records[1].source == f"{path}#1"


def test_jsonl_bad_line_is_skipped_and_rest_loads(tmp_path: Path, folder: Path, caplog) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [rec("r1"), '{"id": "r2", "conversations": [', rec("r3")])
    counter = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="lmmkit.data"):
        records = list(read_llava(path, folder, "skip", counter))
    assert [r.id for r in records] == ["r1", "r3"]
    assert records[1].source == f"{path}#3"  # line numbers, 1-based
    assert counter.as_dict() == {"unreadable JSON": 1}
    assert f"{path}#2" in caplog.text and "line 2" in caplog.text


def test_jsonl_blank_lines_are_not_records(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec("r1")) + "\n\n" + json.dumps(rec("r2")) + "\n\n")
    counter = BadRecordCounter()
    assert [r.id for r in read_llava(path, folder, counter=counter)] == ["r1", "r2"]
    assert counter.total == 0


def test_stop_policy_raises_on_bad_line(tmp_path: Path, folder: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [rec("r1"), "not json", rec("r3")])
    it = read_llava(path, folder, "stop")
    assert next(it).id == "r1"
    with pytest.raises(DataError) as exc:
        next(it)
    assert str(path) in str(exc.value) and "line 2" in str(exc.value)


@pytest.mark.parametrize(
    ("record", "reason", "fragment"),
    [
        (rec("noasst", answer=None), "no assistant turn", "no assistant turn"),
        (rec("tags", question="<image> <image> compare"), "image tag mismatch", "2 <image> tag(s)"),
        (rec("notag", question="What?"), "image tag mismatch", "0 <image> tag(s)"),
        (rec("missing", image="nope.png"), "missing image", "not found"),
        (rec("escape", image="../outside.png"), "image path escapes folder", "outside the image folder"),
        ({"id": "spk", "conversations": [{"from": "bot", "value": "x"}]}, "malformed record", "'bot'"),
        ({"id": "noconv"}, "malformed record", "conversations"),
        ({"id": "imgtype", "image": 3, "conversations": []}, "malformed record", "'image'"),
        (["not", "an", "object"], "malformed record", "not an object"),
    ],
)
def test_bad_records_are_skipped_and_named(
    tmp_path: Path, folder: Path, record, reason: str, fragment: str
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [rec("good"), record, rec("good2")])
    counter = BadRecordCounter()
    assert [r.id for r in read_llava(path, folder, "skip", counter)] == ["good", "good2"]
    assert counter.as_dict() == {reason: 1}
    with pytest.raises(DataError) as exc:
        list(read_llava(path, folder, "stop"))
    msg = str(exc.value)
    assert f"{path}#2" in msg and fragment in msg
    if isinstance(record, dict):
        assert f"id={record['id']}" in msg


def test_record_without_id_is_named_by_position(tmp_path: Path, folder: Path) -> None:
    r = rec("x", answer=None)
    del r["id"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps([rec("ok"), r]))
    with pytest.raises(DataError, match=r"t\.json#1 \(id=1\)"):
        list(read_llava(path, folder, "stop"))


def test_open_images_catches_corrupt_file(tmp_path: Path, folder: Path, corrupt_png) -> None:
    corrupt_png("bad.png", "garbage", folder=folder)
    path = write_jsonl(tmp_path / "t.jsonl", [rec("r1"), rec("r2", image="bad.png")])
    # Without opening, the file exists, so the record passes.
    assert len(list(read_llava(path, folder))) == 2
    counter = BadRecordCounter()
    assert [r.id for r in read_llava(path, folder, counter=counter, open_images=True)] == ["r1"]
    assert counter.as_dict() == {"corrupt image": 1}


def test_whole_file_not_json(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("this is not json at all")
    with pytest.raises(DataError) as exc:
        list(read_llava(path, folder))
    assert str(path) in str(exc.value) and "not valid JSON" in str(exc.value)


def test_binary_file_and_wrong_top_level(tmp_path: Path, folder: Path) -> None:
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="b.json"):
        list(read_llava(binary, folder))
    obj = tmp_path / "o.json"
    obj.write_text(json.dumps(rec("r")))
    with pytest.raises(DataError, match="expected a JSON list"):
        list(read_llava(obj, folder))


def test_json_lines_named_json_gets_a_hint(tmp_path: Path, folder: Path) -> None:
    path = write_jsonl(tmp_path / "t.json", [rec("r1"), rec("r2")])
    with pytest.raises(DataError, match=r"\.jsonl"):
        list(read_llava(path, folder))


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        list(read_llava(tmp_path / "nope.json", None))


@pytest.mark.parametrize("name", ["out.json", "out.jsonl"])
def test_write_read_roundtrip(tmp_path: Path, folder: Path, name: str) -> None:
    records = [
        ConversationRecord(
            "r0", [Message("user", "<image>\nWhat?"), Message("assistant", "Red.")], images=[folder / "a.png"]
        ),
        ConversationRecord(
            "r1",
            [Message("system", "Sys"), Message("user", "<image><image>ünïcode"), Message("assistant", "Yes")],
            images=[folder / "a.png", folder / "sub" / "b.png"],
        ),
        ConversationRecord("r2", [Message("user", "Hi"), Message("assistant", "Hello")]),
    ]
    out = tmp_path / name
    assert write_llava(records, out, folder) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    raw = out.read_text(encoding="utf-8")
    assert "sub/b.png" in raw and str(folder) not in raw  # relative paths
    back = list(read_llava(out, folder, "stop"))
    assert [(r.id, r.messages, r.images) for r in back] == [
        (r.id, r.messages, [Path(p).resolve() for p in r.images]) for r in records
    ]


def test_write_is_atomic_on_failure(tmp_path: Path, folder: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text("OLD")
    bad = ConversationRecord("bad", [Message("user", "Hi")])  # no assistant turn: refused
    good = ConversationRecord("ok", [Message("user", "Hi"), Message("assistant", "Yo")])
    with pytest.raises(DataError, match="no assistant turn"):
        write_llava([good, bad], out, folder)
    assert out.read_text() == "OLD"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.json"]


def test_write_refuses_image_outside_folder(tmp_path: Path, folder: Path, make_png) -> None:
    outside = make_png("elsewhere.png")
    r = ConversationRecord("r", [Message("user", "<image>"), Message("assistant", "x")], images=[outside])
    with pytest.raises(DataError, match="outside the image folder"):
        write_llava([r], tmp_path / "o.json", folder)

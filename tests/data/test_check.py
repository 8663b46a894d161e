from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmmkit.data.check import (
    MAX_WARNINGS_PER_REASON,
    BadRecordCounter,
    check_file,
    data_error,
    format_report,
    reason_of,
)
from lmmkit.data.schema import ConversationRecord, DataError, Message


def test_counter_stop_reraises_same_error() -> None:
    err = data_error("f.json#3 (id=x): image file not found: a.png", "missing image")
    with pytest.raises(DataError) as exc:
        BadRecordCounter().handle(err, "stop")
    assert exc.value is err


def test_counter_skip_counts_by_reason_and_logs(caplog) -> None:
    c = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="lmmkit.data"):
        c.handle(data_error("f.json#1 (id=a): image file not found", "missing image"), "skip")
        c.handle(data_error("f.json#2 (id=b): image file not found", "missing image"), "skip")
        c.handle(data_error("f.json#3 (id=c): cannot read image", "corrupt image"), "skip")
    assert c.total == 3
    assert c.as_dict() == {"missing image": 2, "corrupt image": 1}
    assert "f.json#2 (id=b)" in caplog.text
    assert all(r.name == "lmmkit.data" for r in caplog.records)
    assert c.summary() == "skipped 3 bad records: 2 missing image, 1 corrupt image"


def test_counter_empty_summary_and_bad_policy() -> None:
    c = BadRecordCounter()
    assert c.total == 0 and c.summary() == "no bad records" and c.as_dict() == {}
    with pytest.raises(ValueError, match="policy"):
        c.handle(DataError("x"), "ignore")  # type: ignore[arg-type]


def test_counter_limits_warnings_but_keeps_counting(caplog) -> None:
    c = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="lmmkit.data"):
        for i in range(MAX_WARNINGS_PER_REASON + 10):
            c.handle(data_error(f"rec {i}", "missing image"), "skip")
    assert c.total == MAX_WARNINGS_PER_REASON + 10
    assert len(caplog.records) == MAX_WARNINGS_PER_REASON + 1  # plus one "further ..." notice


def test_reason_of_plain_validation_errors() -> None:
    def err_of(record: ConversationRecord) -> DataError:
        with pytest.raises(DataError) as exc:
            record.validate()
        return exc.value

    assert reason_of(err_of(ConversationRecord("a", [Message("user", "hi")]))) == "no assistant turn"
    tagged = ConversationRecord("b", [Message("user", "<image>"), Message("assistant", "x")])
    assert reason_of(err_of(tagged)) == "image tag mismatch"
    assert reason_of(DataError("something else")) == "other"


def test_check_file_counts_everything(tmp_path: Path, make_png, corrupt_png, png_bytes) -> None:
    folder = tmp_path / "images"
    make_png("ok.png", folder=folder)
    corrupt_png("garbage.png", "garbage", folder=folder)
    corrupt_png("half.png", "truncated", folder=folder)
    (folder / "bomb.png").write_bytes(png_bytes(60_000, 60_000, idat=b"x"))

    def r(rid: str, image: str | None = "ok.png", q: str = "<image>\nQ?", a: str | None = "A.") -> str:
        conv = [{"from": "human", "value": q}] + ([{"from": "gpt", "value": a}] if a is not None else [])
        d: dict = {"id": rid, "conversations": conv}
        if image is not None:
            d["image"] = image
        return json.dumps(d)

    lines = [
        r("good1"),
        r("good2", image=None, q="Text only?"),
        r("missing", image="missing.png"),
        r("corrupt", image="garbage.png"),
        r("truncated", image="half.png"),
        r("bomb", image="bomb.png"),
        r("escape", image="../../etc/passwd"),
        r("noanswer", a=None),
        r("tags", q="<image><image>"),
        "{oops",
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")

    report = check_file(data, folder)
    assert (report.n_ok, report.n_bad) == (2, 8)
    assert report.counter.as_dict() == {
        "missing image": 1,
        "corrupt image": 1,
        "truncated image": 1,
        "decompression bomb": 1,
        "image path escapes folder": 1,
        "no assistant turn": 1,
        "image tag mismatch": 1,
        "unreadable JSON": 1,
    }
    text = format_report(report)
    assert text.splitlines()[0] == f"{data}: 10 records, 2 ok, 8 bad"
    assert "1 x decompression bomb" in text and "id=bomb" in text and f"{data}#10" in text

    # Without opening images, only the cheap checks run: corrupt, truncated and bomb files pass.
    quick = check_file(data, folder, open_images=False)
    assert (quick.n_ok, quick.n_bad) == (5, 5)


def test_check_file_unreadable_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{{{")
    with pytest.raises(DataError, match="x.json"):
        check_file(path, None)

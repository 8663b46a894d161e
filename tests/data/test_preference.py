"""Preference records: validation, the two published formats, answer-only labels, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lmmkit.data.check import BadRecordCounter
from lmmkit.data.formats.preference import read_preferences, vlfeedback_score, write_preferences
from lmmkit.data.preference import PreferenceRecord, encode_preferences
from lmmkit.data.schema import DataError, Message
from lmmkit.data.templates import IGNORE_INDEX


def _image(folder: Path, name: str = "a.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / name)
    return folder / name


def _completion(text: str, *ratings) -> dict:
    aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    return {"model": "m", "response": text,
            "annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings, strict=False)}}


def test_pairs_format_reads_strings_conversations_and_trl_messages(tmp_path):
    _image(tmp_path / "img")
    rows = [
        {"id": "s", "image": "a.png", "prompt": "What is here?", "chosen": "A red square.", "rejected": "A cat."},
        {"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}],
         "chosen": "Red.", "rejected": "Blue.", "chosen_rating": 5, "rejected_rating": "2"},
        {"id": "t", "images": ["a.png"], "prompt": [{"role": "user", "content": "Describe."}],
         "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Green."}]},
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    recs = list(read_preferences(tmp_path / "p.json", tmp_path / "img", policy="stop"))
    assert [r.id for r in recs] == ["s", "c", "t"]
    # A prompt with an image but no tag gets the tag in front (LLaVA convention); one tag, not two.
    assert recs[0].prompt == [Message("user", "<image>\nWhat is here?")]
    assert recs[1].prompt[0].content.count("<image>") == 1
    assert (recs[1].chosen_rating, recs[1].rejected_rating) == (5.0, 2.0)
    assert (recs[2].chosen, recs[2].rejected) == ("Red.", "Green.")
    assert all(Path(r.images[0]).is_absolute() for r in recs)


def test_vlfeedback_makes_all_ranked_pairs_and_drops_ties(tmp_path):
    _image(tmp_path / "img")
    row = {"id": "v1", "prompt": "Describe the image.", "img_path": "a.png", "models": ["a", "b", "c", "d"],
           "completions": [_completion("A", "5", "4", "5"),       # mean 4.67
                           _completion("B", "3", "3", "3"),       # mean 3
                           _completion("C", "3", "N/A", "3"),     # N/A left out: mean 3 (ties B)
                           _completion("D", "1", "2", "3")]}      # mean 2
    (tmp_path / "v.jsonl").write_text(json.dumps(row) + "\n")
    recs = list(read_preferences(tmp_path / "v.jsonl", tmp_path / "img", policy="stop"))
    pairs = {(r.chosen, r.rejected) for r in recs}
    assert pairs == {("A", "B"), ("A", "C"), ("A", "D"), ("B", "D"), ("C", "D")}  # B-C tie dropped
    assert all(r.chosen_rating > r.rejected_rating for r in recs)
    assert vlfeedback_score(row["completions"][2]) == pytest.approx(3.0)
    assert vlfeedback_score(_completion("x", "N/A")) is None


def test_bad_records_are_skipped_and_counted_with_their_names(tmp_path, caplog):
    _image(tmp_path / "img")
    rows = [
        {"id": "ok", "image": "a.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"},
        {"id": "nochosen", "image": "a.png", "prompt": "Q?", "rejected": "no"},
        {"id": "same", "image": "a.png", "prompt": "Q?", "chosen": "no ", "rejected": "no"},
        {"id": "noimage", "image": "missing.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"},
        {"id": "escape", "image": "../outside.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"},
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    counter = BadRecordCounter()
    recs = list(read_preferences(tmp_path / "p.json", tmp_path / "img", counter=counter))
    assert [r.id for r in recs] == ["ok"]
    assert counter.total == 4
    summary = counter.summary()
    assert "identical chosen and rejected" in summary and "missing image" in summary
    with pytest.raises(DataError, match=r"p\.json#1 \(id=nochosen\): 'chosen' is missing"):
        list(read_preferences(tmp_path / "p.json", tmp_path / "img", policy="stop"))


def test_unreadable_line_is_named_and_the_rest_still_read(tmp_path):
    _image(tmp_path / "img")
    good = json.dumps({"id": "g", "image": "a.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"})
    (tmp_path / "p.jsonl").write_text(good + "\n{broken\n" + good + "\n")
    counter = BadRecordCounter()
    assert len(list(read_preferences(tmp_path / "p.jsonl", tmp_path / "img", counter=counter))) == 2
    assert counter.total == 1
    with pytest.raises(DataError, match=r"p\.jsonl#2: line 2 is not valid JSON"):
        list(read_preferences(tmp_path / "p.jsonl", tmp_path / "img", policy="stop"))


def test_write_then_read_round_trips(tmp_path):
    img = _image(tmp_path / "img")
    rec = PreferenceRecord("r1", [Message("user", "<image>\nQ?")], "Yes", "No", images=[img])
    for name in ("out.json", "out.jsonl"):
        assert write_preferences([rec], tmp_path / name, tmp_path / "img") == 1
        back = list(read_preferences(tmp_path / name, tmp_path / "img", policy="stop"))
        assert (back[0].prompt, back[0].chosen, back[0].rejected) == (rec.prompt, "Yes", "No")
        assert Path(back[0].images[0]) == img.resolve()


def test_labels_cover_only_the_final_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [Message("user", "<image>\nhello"), Message("assistant", "earlier answer"), Message("user", "and now?")]
    rec = PreferenceRecord("x", prompt, "chosen words", "rejected words", images=["a.png"])
    image_id = tok.convert_tokens_to_ids("<image>")
    pairs = encode_preferences([rec], tok, image_id, 3, 512, BadRecordCounter(), "stop")
    assert len(pairs) == 1
    for sample, text in ((pairs[0].chosen, "chosen words"), (pairs[0].rejected, "rejected words")):
        labelled = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
        decoded = tok.decode(labelled)
        assert decoded.startswith(text) and "earlier" not in decoded
        assert sample.input_ids.count(image_id) == 3  # the image expanded to its 3 slots
    # Both sequences share the prompt tokens exactly.
    n = pairs[0].chosen.labels.index(next(lab for lab in pairs[0].chosen.labels if lab != IGNORE_INDEX))
    assert pairs[0].chosen.input_ids[:n] == pairs[0].rejected.input_ids[:n]


def test_too_long_pairs_are_dropped_and_named(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = PreferenceRecord("long", [Message("user", "<image>\nQ")], "a", "b", images=["a.png"], source="f.json#3")
    counter = BadRecordCounter()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert encode_preferences([rec], tok, image_id, 50, 20, counter) == []
    assert counter.total == 1
    with pytest.raises(DataError, match=r"f\.json#3 \(id=long\)"):
        encode_preferences([rec], tok, image_id, 50, 20, BadRecordCounter(), "stop")

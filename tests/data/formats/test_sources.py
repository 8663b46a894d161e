"""Source specs: the syntax, dispatch to each loader, and their errors."""

from __future__ import annotations

import json

import pytest

from formats_helpers import b64, picture, write_jsonl
from lmmkit.data.check import BadRecordCounter
from lmmkit.data.formats.webdataset import WebDatasetStream
from lmmkit.data.schema import DataError
from lmmkit.data.sources import SourceSpec, SourceSpecError, open_source, parse_source


def test_spec_syntax():
    assert parse_source("wds:/d/shards-{000..003}.tar#seed=3") == SourceSpec("wds", "/d/shards-{000..003}.tar",
                                                                              (), {"seed": "3"})
    assert parse_source("sharegpt4v:f.json@/a,/b") == SourceSpec("sharegpt4v", "f.json", ("/a", "/b"))
    spec = parse_source("hf:/data/set#image=img,user=question,assistant=answer,check=header")
    assert spec.options == {"image": "img", "user": "question", "assistant": "answer", "check": "header"}
    assert str(spec) == "hf:/data/set#image=img,user=question,assistant=answer,check=header"
    assert parse_source("llava:train.json@imgs").roots == ("imgs",)


@pytest.mark.parametrize("spec, message", [
    ("train.json", "KIND one of"),
    ("parquet:x", "KIND one of"),
    ("wds:x.tar#shuffle=1", "takes the options seed, check"),
    ("m3it:x.jsonl@/images", "takes no @ROOT"),
    ("llava:x.json@a,b", "only sharegpt4v"),
    ("llava:x.json#check=maybe", "check must be one of"),
    ("wds:#seed=1", "no path"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SourceSpecError, match=message):
        parse_source(spec)


def test_each_kind_dispatches_to_its_reader(tmp_path, make_png, make_shards):
    make_png("imgs/a.png", folder=tmp_path)
    llava = tmp_path / "train.json"
    llava.write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]}]))
    assert [r.id for r in open_source(f"llava:{llava}@{tmp_path / 'imgs'}")] == ["1"]
    assert [r.id for r in open_source(f"sharegpt4v:{llava}@{tmp_path},{tmp_path / 'imgs'}")] == ["1"]
    m3it = write_jsonl(tmp_path / "m3it.jsonl", [{"instruction": "Describe.", "inputs": "", "outputs": "A.",
                                                  "image_base64_str": [b64(picture(0))]}])
    assert len(list(open_source(f"m3it:{m3it}"))) == 1
    pattern, truth = make_shards(n_shards=2, per_shard=2)
    stream = open_source(f"wds:{pattern}#seed=1")
    assert isinstance(stream, WebDatasetStream) and stream.seed == 1
    first = next(stream)
    rest = [r.id for r in open_source(f"wds:{pattern}#seed=1", state=stream.state_dict())]
    assert sorted([first.id, *rest]) == sorted(truth)
    with pytest.raises(SourceSpecError, match="only wds"):
        open_source(f"m3it:{m3it}", state=stream.state_dict())


def test_check_option_and_policy_reach_the_reader(tmp_path):
    rows = [{"instruction": "Describe.", "inputs": "", "outputs": "A.", "image_base64_str": [b64(picture(0))]},
            {"instruction": "Describe.", "inputs": "", "outputs": "B.", "image_base64_str": ["%%%"]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    counter = BadRecordCounter()
    assert len(list(open_source(f"m3it:{path}", counter=counter))) == 1 and counter.total == 1
    with pytest.raises(DataError, match=r"m\.jsonl#2"):
        list(open_source(f"m3it:{path}", policy="stop"))
    with pytest.raises(DataError, match="not found"):
        open_source(f"arxivqa:{tmp_path / 'nope.jsonl'}")

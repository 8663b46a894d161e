"""Mixtures: the spec and its errors, the draw, worker processes, and exact resume (also after a kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from formats_helpers import encode, write_tar
from lmmkit.data.mixture import MixtureLoader, choose, cumulative_weights
from lmmkit.data.mixture_spec import MixtureError, MixtureSpec, parse_mixture, resolve_mixture_paths
from lmmkit.data.schema import DataError

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)))


def make_data(root: Path, n_shards: int = 4, per_shard: int = 6, n_text: int = 15, bad: bool = False) -> str:
    """wds shards (img2dataset layout) + a LLaVA JSON lines file of text records; the inline mixture over them.
    With `bad`: one JPEG that does not decode (shard 1) and one line that is not JSON."""
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:03d}{i:03d}"
            data = b"\xff\xd8\xff not really a jpeg" if bad and (s, i) == (1, 2) else _jpeg(s * 100 + i)
            members += [(f"{key}.jpg", data), (f"{key}.txt", f"caption {key}".encode())]
        write_tar(root / "shards" / f"{s:03d}.tar", members)
    lines = [json.dumps({"id": f"t{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                          {"from": "gpt", "value": f"answer {i}"}]})
             for i in range(n_text)]
    if bad:
        lines.insert(4, "{not json")
    (root / "text.jsonl").write_text("\n".join(lines) + "\n")
    return (f"img=0.6*wds:{root}/shards/{{000..{n_shards - 1:03d}}}.tar#seed=7;"
            f"txt=0.4*llava:{root}/text.jsonl")


def ids(block) -> list[str]:
    return [r.id for r in block]


def take(loader: MixtureLoader, n: int) -> list[list[str]]:
    out = []
    for block in loader:
        out.append(ids(block))
        if len(out) == n:
            break
    return out


def test_inline_and_file_mixtures_parse_and_validate(tmp_path):
    spec = parse_mixture("cc=2*wds:/d/{0..3}.tar;1*llava:a.json@imgs;llava:b.jsonl", seed=4)
    assert [s.name for s in spec.sources] == ["cc", "llava-2", "llava-3"]
    assert [s.weight for s in spec.sources] == [2.0, 1.0, 1.0] and spec.seed == 4
    assert spec.probabilities == [0.5, 0.25, 0.25]
    assert parse_mixture("wds:/x/*.tar").sources[0].source == "wds:/x/*.tar"  # a glob's * is not a weight
    (tmp_path / "mix.yaml").write_text("sources:\n  - {name: cap, source: 'wds:shards/{000..001}.tar', weight: 3}\n"
                                       "  - {source: 'llava:data/t.json@data/images'}\n")
    spec = parse_mixture(str(tmp_path / "mix.yaml"))
    assert spec.sources[0].source == f"wds:{tmp_path}/shards/{{000..001}}.tar"  # relative to the file
    assert spec.sources[1].source == f"llava:{tmp_path}/data/t.json@{tmp_path}/data/images"
    assert spec.sources[1].name == "llava-2" and spec.sources[1].weight == 1.0
    # a config's value: relative paths resolve against the config's folder
    assert resolve_mixture_paths("mix.yaml", "/cfg") == "/cfg/mix.yaml"
    assert resolve_mixture_paths("a=2*wds:s/{0..1}.tar#seed=1;llava:t.json@im", "/cfg") == \
        "a=2*wds:/cfg/s/{0..1}.tar#seed=1;llava:/cfg/t.json@/cfg/im"


def test_mixture_errors_name_every_problem(tmp_path):
    with pytest.raises(MixtureError) as e:
        parse_mixture("a=0*wds:/x.tar;a=-1*llava:y.json;b=1*nope:z")
    text = str(e.value)
    assert "3 problems" not in text and len(e.value.errors) == 4
    assert "source 1 (a): weight must be a number > 0, got 0.0" in text
    assert "source 2 (a): name 'a' is already used by source 1" in text
    assert "source 3 (b): source 'nope:z': expected KIND:PATH" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 3\nsources: []\n")
    with pytest.raises(MixtureError, match="the seed is a run setting"):
        parse_mixture(str(bad))
    bad.write_text("sources:\n  - {source: 'llava:a.json', wieght: 2}\n")
    with pytest.raises(MixtureError, match="unknown key 'wieght'; did you mean 'weight'"):
        parse_mixture(str(bad))
    bad.write_text("sources:\n  - {source: 'llava:a.json', weight: 'lots'}\n")
    with pytest.raises(MixtureError, match=r"source 1 \(llava-1\): weight must be a number > 0, got 'lots'"):
        parse_mixture(str(bad))
    with pytest.raises(MixtureError, match="no sources"):
        MixtureSpec(()).validate()
    with pytest.raises(MixtureError, match=r"source txt: .*missing.jsonl does not exist"):
        MixtureLoader(parse_mixture(f"txt=1*llava:{tmp_path}/missing.jsonl"))


def test_the_draw_is_a_function_of_seed_and_index_with_the_weights():
    spec = parse_mixture("a=0.7*llava:a.jsonl;b=0.2*llava:b.jsonl;c=0.1*llava:c.jsonl", seed=11)
    cum = cumulative_weights(spec)
    draws = [choose(11, i, cum) for i in range(20000)]
    assert draws == [choose(11, i, cum) for i in range(20000)]
    freq = Counter(draws)
    assert abs(freq[0] / 20000 - 0.7) < 0.015 and abs(freq[1] / 20000 - 0.2) < 0.015
    assert draws[:200] != [choose(12, i, cum) for i in range(200)]  # the seed matters


def test_workers_give_the_same_blocks_as_one_process_and_resume_exactly(tmp_path, one_torch_thread):
    spec = parse_mixture(make_data(tmp_path), seed=3)
    reference = take(MixtureLoader(spec, batch_size=2, n_streams=2), 30)  # sources repeat: 60 samples > 39 records
    assert take(MixtureLoader(spec, batch_size=2, num_workers=2), 30) == reference
    drawn = [choose(3, i, cumulative_weights(spec)) for i in range(60)]
    assert [b.startswith("t") for block in reference for b in block] == [d == 1 for d in drawn]
    for cut in (1, 7, 16):
        first = MixtureLoader(spec, batch_size=2, n_streams=2)
        assert take(first, cut) == reference[:cut]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
        assert take(MixtureLoader(spec, batch_size=2, n_streams=2, state=state), 30 - cut) == reference[cut:]
        assert take(MixtureLoader(spec, batch_size=2, num_workers=2, state=state), 30 - cut) == reference[cut:]
    for other in (dict(spec=parse_mixture(make_data(tmp_path), seed=4), batch_size=2, n_streams=2),
                  dict(spec=spec, batch_size=3, n_streams=2), dict(spec=spec, batch_size=2, n_streams=1)):
        with pytest.raises(DataError, match="Resume with the same mixture"):
            MixtureLoader(**other, state=state)


def test_fewer_shards_than_streams_split_by_record_and_resume(tmp_path, one_torch_thread):
    make_data(tmp_path, n_shards=1, per_shard=9)
    spec = parse_mixture(f"img=1*wds:{tmp_path}/shards/000.tar")
    reference = take(MixtureLoader(spec, n_streams=2), 12)  # stream 0: records 0, 2, ..; stream 1: 1, 3, ..
    assert [b[0] for b in reference[:9]] == [f"000{i:03d}" for i in range(9)]
    first = MixtureLoader(spec, num_workers=2)
    assert take(first, 5) == reference[:5]
    assert take(MixtureLoader(spec, num_workers=2, state=first.state_dict()), 7) == reference[5:]


def test_bad_records_are_counted_once_also_across_streams_and_resume(tmp_path):
    make_data(tmp_path, bad=True)
    text = parse_mixture(f"txt=1*llava:{tmp_path}/text.jsonl")  # 15 good lines and a broken 5th line
    loader = MixtureLoader(text, n_streams=2)
    assert [i for b in take(loader, 14) for i in b] == [f"t{i}" for i in range(14)]
    assert loader.bad_records() == {"unreadable JSON": 1}  # both streams read the line; one counts it
    for cut in (2, 10):  # before and after the broken line
        first = MixtureLoader(text, n_streams=2)
        take(first, cut)
        resumed = MixtureLoader(text, n_streams=2, state=first.state_dict())
        take(resumed, 14 - cut)
        assert resumed.bad_records() == {"unreadable JSON": 1}, cut
    with pytest.raises(DataError, match=r"text\.jsonl#5: line 5 is not valid JSON"):
        take(MixtureLoader(text, n_streams=2, policy="stop"), 14)

    images = parse_mixture(f"img=1*wds:{tmp_path}/shards/{{000..003}}.tar#seed=7")  # 24 records, 1 broken
    loader = MixtureLoader(images, n_streams=2)
    assert len({i for b in take(loader, 22) for i in b} - {"001002"}) == 22
    assert loader.bad_records() == {"corrupt image": 1}
    with pytest.raises(DataError, match=r"001\.tar:001002\.jpg"):
        take(MixtureLoader(images, n_streams=2, policy="stop"), 22)


def test_a_transform_error_takes_the_next_record_and_counts(tmp_path):
    spec = parse_mixture(make_data(tmp_path), seed=3)

    def transform(record):
        if record.id == "t1":
            raise DataError(f"{record.where}: refused by the transform")
        return record

    blocks = take(MixtureLoader(spec, batch_size=2, n_streams=1, transform=transform), 10)
    flat = [i for b in blocks for i in b]
    assert "t1" not in flat and "t2" in flat and len(flat) == 20


def test_a_source_with_no_record_for_a_stream_is_an_error(tmp_path):
    make_data(tmp_path, n_text=1)
    spec = parse_mixture(f"txt=1*llava:{tmp_path}/text.jsonl")
    with pytest.raises(DataError, match=r"mixture source txt .*no good record for stream 1 of 2 .*fewer records"):
        take(MixtureLoader(spec, n_streams=2), 4)


DRIVER = """
import json, os, sys, time
from lmmkit.atomic import atomic_write
from lmmkit.data.mixture import MixtureLoader
from lmmkit.data.mixture_spec import parse_mixture

mixture, log, ckpt = sys.argv[1], sys.argv[2], sys.argv[3]
loader = MixtureLoader(parse_mixture(mixture, seed=3), batch_size=2, num_workers=2, transform=lambda r: r.id)
with open(log, "a") as f:
    for n, block in enumerate(loader, start=1):
        f.write(json.dumps(block) + "\\n")
        f.flush()
        atomic_write(ckpt, json.dumps({"blocks": n, "state": loader.state_dict()}))  # a training checkpoint
        time.sleep(0.05)
        if n == 200:
            break
"""


def test_killed_run_resumes_with_the_same_next_samples(tmp_path, one_torch_thread):
    mixture = make_data(tmp_path)
    spec = parse_mixture(mixture, seed=3)
    reference = take(MixtureLoader(spec, batch_size=2, n_streams=2), 60)
    driver, log, ckpt = tmp_path / "driver.py", tmp_path / "log.jsonl", tmp_path / "ckpt.json"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(driver), mixture, str(log), str(ckpt)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and json.loads(ckpt.read_text())["blocks"] >= 9:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its DataLoader workers, mid-run
        proc.wait()
    saved = json.loads(ckpt.read_text())
    done = saved["blocks"]
    assert 9 <= done < 60 and saved["state"]["blocks"] == done
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged[:done] == reference[:done]
    resumed = MixtureLoader(spec, batch_size=2, num_workers=2, state=saved["state"])
    assert take(resumed, 60 - done) == reference[done:]


def test_mix_command_counts_writes_and_continues_from_its_state(tmp_path, capsys):
    from lmmkit.cli import main

    mixture = make_data(tmp_path)
    reference = [r for b in take(MixtureLoader(parse_mixture(mixture, seed=3)), 15) for r in b]
    state = tmp_path / "state.json"
    assert main(["data", "mix", mixture, "--seed", "3", "--take", "10", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "samples 0..9 of mixture (seed 3)" in out and "img " in out and "txt " in out
    assert main(["data", "mix", mixture, "--seed", "3", "--take", "5", "--state", str(state),
                 "--out", str(tmp_path / "next.jsonl")]) == 0
    written = [json.loads(line)["id"] for line in (tmp_path / "next.jsonl").read_text().splitlines()]
    assert written == reference[10:15]
    assert main(["data", "mix", mixture, "--seed", "4", "--state", str(state)]) == 2  # another seed: refused
    assert "Resume with the same mixture" in capsys.readouterr().err

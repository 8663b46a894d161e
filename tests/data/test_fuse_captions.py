"""`lmmkit data fuse-captions` against a real OpenAI-compatible HTTP server on localhost (tests/openai_stub.py):
input formats, bad items, the cache, LLM errors, and a killed run resumed without losing or repeating rows."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from lmmkit.cli import main
from lmmkit.data.check import BadRecordCounter
from lmmkit.data.fuse_captions import CAPSFUSION_PROMPT, clean_fusion, iter_caption_pairs, resume_point
from lmmkit.data.schema import DataError
from openai_stub import StubServer

ROOT = Path(__file__).resolve().parents[2]
PAIR = re.compile(r"Sentence 1: (.*)\nSentence 2: (.*)$", re.S)


def fused(raw: str, synthetic: str) -> str:
    return f"{synthetic.rstrip('.')}, namely {raw}."


def answer(model: str, prompt: str, images: list[bytes], temperature: float) -> str:
    raw, synthetic = PAIR.search(prompt).groups()
    return f'Merged sentence: "{fused(raw, synthetic)}"'  # a label and quotes: clean_fusion drops them


def write_items(path: Path, n: int, broken: dict[int, str] | None = None) -> Path:
    lines = []
    for i in range(n):
        line = json.dumps({"id": f"img{i:04d}", "raw": f"IMG_{i}.JPG Eiffel Tower Paris 2019 cheap flights",
                           "synthetic": f"a tall metal tower under a blue sky number {i}.", "url": f"http://x/{i}"})
        lines.append((broken or {}).get(i, line))
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_from_json_lines_and_shards_with_bad_items_named(tmp_path):
    src = write_items(tmp_path / "in.jsonl", 5, broken={1: "{oops", 3: json.dumps({"id": "x", "raw": "only raw"})})
    counter = BadRecordCounter()
    pairs = list(iter_caption_pairs(str(src), counter=counter))
    assert [(p.index, p.id) for p in pairs] == [(0, "img0000"), (2, "img0002"), (4, "img0004")]
    assert counter.as_dict() == {"unreadable JSON": 1, "missing caption": 1}
    assert "in.jsonl#4: no synthetic caption 'synthetic' (field is missing)" in counter.examples("missing caption")[0]
    with pytest.raises(DataError, match=r"in\.jsonl#2: line 2 is not valid JSON"):
        list(iter_caption_pairs(str(src), policy="stop"))

    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, txt, meta in (("k0", b"alt zero", {"blip": "a photo"}), ("k1", b"alt one", {}),
                               ("k2", b"alt two", {"blip": "a dog"})):
            for name, data in ((f"{key}.jpg", b"\xff\xd8\xff"), (f"{key}.txt", txt), (f"{key}.json",
                                                                                    json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    counter = BadRecordCounter()
    pairs = list(iter_caption_pairs(f"wds:{tmp_path}/shards/000.tar", synthetic_field="blip", counter=counter))
    assert [(p.index, p.id, p.raw, p.synthetic) for p in pairs] == [(0, "k0", "alt zero", "a photo"),
                                                                      (2, "k2", "alt two", "a dog")]
    assert pairs[0].row["shard"].endswith("000.tar") and counter.total == 1
    assert "000.tar#k1: no synthetic caption 'blip'" in counter.examples("missing caption")[0]


def test_clean_fusion_and_the_prompt():
    assert clean_fusion('  "A red bus in London."  ') == "A red bus in London."
    assert clean_fusion("Merged sentence: A red bus.") == "A red bus."
    assert clean_fusion("Sentence: \u201cA bus.\u201d") == "A bus."
    assert "{raw}" in CAPSFUSION_PROMPT and "{synthetic}" in CAPSFUSION_PROMPT


def test_fuses_in_order_caches_and_reruns_for_free(tmp_path, capsys):
    src = write_items(tmp_path / "in.jsonl", 12, broken={5: "[1, 2]"})
    out = tmp_path / "fused.jsonl"
    with StubServer(answer) as server:
        args = ["data", "fuse-captions", str(src), "--llm", f"openai:{server.url}#fuser", "--out", str(out),
                "--concurrency", "4"]
        assert main(args) == 0
        assert len(server.requests) == 11
        got = rows(out)
        assert [r["id"] for r in got] == [f"img{i:04d}" for i in range(12) if i != 5]  # input order
        assert all(r["fused"] == fused(r["raw"], r["synthetic"]) and r["url"] for r in got)
        assert got[0]["_fuse"] == {"index": 0, "id": "img0000", "where": f"{src}#1", "model": "openai:fuser"}
        assert "11 captions fused" in capsys.readouterr().out
        assert main(args) == 0  # nothing left to do
        assert len(server.requests) == 11 and rows(out) == got
        out.unlink()  # the output gone, the cache kept: every answer comes from the cache
        assert main(args) == 0
        assert len(server.requests) == 11 and rows(out) == got
        assert "0 LLM calls, 11 answers from the cache" in capsys.readouterr().out


def test_llm_errors_stop_by_default_or_are_recorded(tmp_path, capsys):
    src = write_items(tmp_path / "in.jsonl", 6)

    def refuse_third(model, prompt, images, temperature):
        return {"status": 400} if "number 2." in prompt else answer(model, prompt, images, temperature)

    out = tmp_path / "fused.jsonl"
    with StubServer(refuse_third) as server:
        args = ["data", "fuse-captions", str(src), "--llm", f"openai:{server.url}#m", "--out", str(out),
                "--concurrency", "1"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{src}#3 (id=img0002): the LLM gave no fusion" in err and "run the same command again" in err
        assert [r["id"] for r in rows(out)] == ["img0000", "img0001"]
        assert main([*args, "--on-llm-error", "record"]) == 0
        got = rows(out)
        assert [r["id"] for r in got] == [f"img{i:04d}" for i in range(6)]
        assert got[2]["fused"] is None and "HTTP 400" in got[2]["fuse_error"] and got[3]["fused"]
    other = write_items(tmp_path / "other.jsonl", 6)
    other.write_text(other.read_text().replace("img0005", "zzz"))
    with pytest.raises(DataError, match="written from another input"):
        from lmmkit.data.fuse_captions import fuse_captions

        fuse_captions(iter_caption_pairs(str(other)), out, llm=None)


ENTRY = """import argparse, sys
from lmmkit.data.scale_cli import add_data_scale_parsers
parser = argparse.ArgumentParser(prog="lmmkit data")
add_data_scale_parsers(parser.add_subparsers(required=True))
args = parser.parse_args()
sys.exit(args.func(args))
"""


def test_killed_run_resumes_without_losing_or_repeating_rows(tmp_path):
    n = 60
    src = write_items(tmp_path / "in.jsonl", n)
    out = tmp_path / "fused.jsonl"
    lock = threading.Lock()
    asked: list[str] = []

    def slow(model, prompt, images, temperature):
        with lock:
            asked.append(PAIR.search(prompt).group(1))
        return {"sleep": 0.03, "then": answer(model, prompt, images, temperature)}

    with StubServer(slow) as server:
        # `lmmkit data fuse-captions ...` without the other subcommands' imports (they take seconds)
        cmd = [sys.executable, "-c", ENTRY, "fuse-captions", str(src), "--llm", f"openai:{server.url}#m",
               "--out", str(out), "--concurrency", "2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_text().count("\n") >= 12:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, proc.stderr.read().decode()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        written = out.read_text().count("\n")
        assert 12 <= written < n
        with out.open("a") as f:
            f.write('{"id": "img9999", "raw": "a line cut by the ki')  # as if killed in the middle of a write
        assert resume_point(out)[0] == written and out.read_text().endswith("\n")
        with out.open("a") as f:
            f.write('{"id": "img9999", "raw": "cut ag')
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"resumed after {written} rows" in result.stdout
    got = rows(out)
    assert [r["_fuse"]["index"] for r in got] == list(range(n))  # every item once, in order
    assert all(r["fused"] == fused(r["raw"], r["synthetic"]) for r in got)
    # Asked again at most: the requests in flight when the process died (2 * concurrency), not the rows written.
    assert n <= len(asked) <= n + 4


def test_a_local_model_fuses_too(tmp_path, tiny_llama_dir, one_torch_thread, capsys):
    src = write_items(tmp_path / "in.jsonl", 3)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Merge into one caption: {raw} | {synthetic}")
    out = tmp_path / "fused.jsonl"
    args = ["data", "fuse-captions", str(src), "--llm", str(tiny_llama_dir), "--out", str(out), "--prompt-file",
            str(prompt), "--max-new-tokens", "6", "--on-llm-error", "record"]
    assert main(args) == 0
    got = rows(out)
    assert [r["id"] for r in got] == ["img0000", "img0001", "img0002"]
    assert all(r["_fuse"]["model"].startswith("hf-text:") for r in got)
    assert all(isinstance(r["fused"], str) or r["fuse_error"] for r in got)  # random weights: any text
    out.unlink()
    assert main(args) == 0 and rows(out) == got  # the same answers, from the cache
    assert "0 LLM calls, 3 answers from the cache" in capsys.readouterr().out.splitlines()[-1]
    prompt.write_text("no placeholders here")
    assert main(args) == 2
    assert "must contain {raw} and {synthetic}" in capsys.readouterr().err

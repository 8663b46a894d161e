"""The eval harness end to end against a real localhost OpenAI-compatible server: POPE files in
the official format, the response cache (resume, no re-asking), failures named by item."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lmmkit.eval.backends.base import BackendError, GenerationSettings, Request
from lmmkit.eval.backends.openai_api import OpenAIBackend, parse_endpoint
from lmmkit.eval.cache import ResponseCache
from lmmkit.eval.runner import EvalError, EvalOptions, run_eval
from lmmkit.eval.tasks.pope import PopeTask
from openai_stub import StubServer

OBJECTS = {"a.png": {"cat", "dog"}, "b.png": {"car"}, "c.png": {"cup", "cat", "bus"}}
COLOURS = {"a.png": (200, 0, 0), "b.png": (0, 200, 0), "c.png": (0, 0, 200)}


def write_pope(root: Path) -> dict[str, set[str]]:
    """Three official-format split files over three images; returns {image sha: objects}."""
    folder = root / "pope"
    (folder / "images").mkdir(parents=True)
    truth = {}
    for name, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(folder / "images" / name)
        truth[hashlib.sha256((folder / "images" / name).read_bytes()).hexdigest()] = OBJECTS[name]
    vocab = sorted(set().union(*OBJECTS.values()))
    for split in ("random", "popular", "adversarial"):
        rows, qid = [], 1
        for name, objs in OBJECTS.items():
            for obj in vocab[:4]:
                rows.append({"question_id": qid, "image": name, "text": f"Is there a {obj} in the image?",
                             "label": "yes" if obj in objs else "no"})
                qid += 1
        (folder / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return truth


def seeing_answerer(truth: dict[str, set[str]], wrong_on: str | None = None):
    """Answers POPE questions correctly from the image bytes (in LLaVA's style: "Yes." / "No, ...")."""
    def answer(model, prompt, images, temperature):
        obj = re.search(r"Is there an? (\w+)", prompt).group(1)
        if wrong_on and obj == wrong_on:
            return {"status": 400}
        present = obj in truth[hashlib.sha256(images[0]).hexdigest()]
        return "Yes." if present else f"No, there is no {obj}."
    return answer


def test_parse_endpoint():
    assert parse_endpoint("openai:http://h:8000/v1#llava") == ("http://h:8000/v1", "llava")
    with pytest.raises(ValueError, match="openai:<base URL>#<model name>"):
        parse_endpoint("openai:http://h:8000/v1")
    with pytest.raises(ValueError, match="http://"):
        parse_endpoint("openai:h:8000#m")


def test_pope_over_http_scores_and_caches(tmp_path, monkeypatch):
    truth = write_pope(tmp_path)
    monkeypatch.setenv("MY_KEY", "sekret")
    with StubServer(seeing_answerer(truth)) as server:
        backend = OpenAIBackend(f"openai:{server.url}#stub-vlm", api_key_env="MY_KEY")
        cache = ResponseCache(tmp_path / "cache.sqlite")
        res = run_eval([PopeTask()], backend, tmp_path, cache, opts=EvalOptions(progress=False))
        pope = res["tasks"]["pope"]
        assert pope["n_items"] == 36 and pope["model_calls"] == 36
        for split in ("random", "popular", "adversarial"):
            assert pope["strict"][split]["f1"] == 1.0 and pope["robust"][split]["f1"] == 1.0
        assert pope["unparseable"] == {"strict": 0, "robust": 0}
        assert server.api_keys[0] == "Bearer sekret"
        sent = server.requests[0]
        assert sent["model"] == "stub-vlm" and sent["temperature"] == 0.0
        assert sent["messages"][0]["content"][1]["text"].endswith("Answer the question using a single word or phrase.")
        # A second run of the same eval (new process: reopen the cache file) asks nothing.
        cache.close()
        res2 = run_eval([PopeTask()], backend, tmp_path, ResponseCache(tmp_path / "cache.sqlite"),
                        opts=EvalOptions(progress=False))
        assert res2["tasks"]["pope"]["model_calls"] == 0 and len(server.requests) == 36
        assert res2["tasks"]["pope"]["strict"] == pope["strict"]


def test_failed_items_are_named_counted_and_resumed(tmp_path):
    truth = write_pope(tmp_path)
    with StubServer(seeing_answerer(truth, wrong_on="bus")) as server:
        backend = OpenAIBackend(f"openai:{server.url}#m", retries=0)
        cache = ResponseCache(tmp_path / "c.sqlite")
        res = run_eval([PopeTask()], backend, tmp_path, cache, opts=EvalOptions(progress=False))["tasks"]["pope"]
        # "bus" is asked about 3 images x 3 splits: each failure named, scored wrong, not cached.
        assert len(res["failures"]) == 9 and all("HTTP 400" in f for f in res["failures"])
        assert "item random/" in res["failures"][0]
        assert res["strict"]["random"]["unparseable"] == 3
        assert res["strict"]["random"]["accuracy"] == pytest.approx(9 / 12)
        with pytest.raises(EvalError, match=r"pope: item \w+/\d+: .*HTTP 400"):
            run_eval([PopeTask()], backend, tmp_path, cache, opts=EvalOptions(progress=False, strict_errors=True))
        server.answer = seeing_answerer(truth)  # the endpoint recovers: only the failed items are asked again
        before = len(server.requests)
        res = run_eval([PopeTask()], backend, tmp_path, cache, opts=EvalOptions(progress=False))["tasks"]["pope"]
        assert res["model_calls"] == 9 and len(server.requests) - before == 9
        assert res["strict"]["random"]["f1"] == 1.0 and not res["failures"]


def test_bad_records_are_named_and_skipped(tmp_path):
    write_pope(tmp_path)
    f = tmp_path / "pope" / "coco_pope_random.json"
    lines = f.read_text().splitlines()
    lines[1] = '{"question_id": 2, "image": "a.png"}'
    lines[2] = lines[2].replace("a.png", "missing.png")
    f.write_text("\n".join(lines) + "\n")
    loaded = PopeTask().load(tmp_path)
    assert len(loaded.items) == 34
    msgs = [str(e) for e in loaded.errors]
    assert any("coco_pope_random.json: record line 2: needs question_id, image, text, label" in m for m in msgs)
    assert any("line 3 (question_id 3): image" in m and "missing.png not found" in m for m in msgs)


def test_timeouts_retries_and_garbage(tmp_path):
    calls = {"n": 0}

    def answer(model, prompt, images, temperature):
        calls["n"] += 1
        if model == "slow":
            return {"sleep": 1.0}
        if model == "garbage":
            return {"raw": b"<html>oops</html>"}
        if model == "flaky" and calls["n"] == 1:
            return {"status": 503}
        return "fine"

    with StubServer(answer) as server:
        settings = GenerationSettings(max_new_tokens=4)
        slow = OpenAIBackend(f"openai:{server.url}#slow", timeout=0.2, retries=1, backoff=0.01)
        out = slow.generate([Request("hi")], settings)[0]
        assert isinstance(out, BackendError) and "no answer after 2 tries" in str(out)
        garbage = OpenAIBackend(f"openai:{server.url}#garbage", retries=0).generate([Request("hi")], settings)[0]
        assert isinstance(garbage, BackendError) and "not a chat completion" in str(garbage)
        calls["n"] = 0
        flaky = OpenAIBackend(f"openai:{server.url}#flaky", retries=2, backoff=0.01)
        assert flaky.generate([Request("hi")], settings) == ["fine"] and calls["n"] == 2


def test_a_killed_eval_resumes_where_it_stopped(tmp_path):
    """`lmmkit eval` in a real process, killed (SIGKILL) mid-run; the re-run asks only what is missing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    truth = write_pope(tmp_path)
    for split in ("random", "popular", "adversarial"):  # 36 -> 360 questions: long enough to kill mid-way
        f = tmp_path / "pope" / f"coco_pope_{split}.json"
        rows = [json.loads(x) for x in f.read_text().splitlines()] * 10
        f.write_text("".join(json.dumps({**r, "question_id": i}) + "\n" for i, r in enumerate(rows)))
    slow = seeing_answerer(truth)
    with StubServer(lambda *a: (time.sleep(0.03), slow(*a))[1]) as server:
        cmd = [sys.executable, "-m", "lmmkit.cli", "eval", "--model", f"openai:{server.url}#m", "--tasks", "pope",
               "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120  # a slow machine may take long to import torch
        while len(server.requests) < 120 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        asked_before = len(server.requests)
        assert 0 < asked_before < 360
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        res = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["pope"]
        # at most one unfinished chunk of 32 per... answers committed chunk by chunk: little is asked twice
        assert res["model_calls"] <= 360 - asked_before + 32 and res["from_cache"] >= asked_before - 32
        assert res["strict"]["mean_f1"] == 1.0 and res["n_items"] == 360

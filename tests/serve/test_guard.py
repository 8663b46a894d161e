"""`lmmkit serve --guard`: moderation of the incoming text, of the text the model reads from the image and
of the answer, end to end with the official `openai` client against a real server on the tiny checkpoint;
local rules and functions, and an OpenAI-compatible /v1/moderations endpoint served on localhost."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import MODEL_NAME, LiveServer, data_url, picture, user_message, wait_until_healthy  # noqa: E402

from lmmkit.eval.backends.base import GenerationSettings, Request  # noqa: E402
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend  # noqa: E402
from lmmkit.serve import ServeLimits  # noqa: E402
from lmmkit.serve.guard import (  # noqa: E402
    DEFAULT_REFUSAL,
    TRANSCRIBE_PROMPT,
    CallableGuard,
    GuardConfigError,
    ModerationGuard,
    RuleGuard,
    ServeGuard,
    Verdict,
    load_guard,
)

LIMITS = ServeLimits(max_tokens=64, default_max_tokens=24, batch_window_ms=20)
RULES = """\
# weapons in what the user asks; a word the tiny model says to "What is in the picture?" in what it answers
[input] weapons: \\bbomb\\b
[output] leak: \\btriangle\\b
[image-text] secrets: password
"""
CLEAN = ("Is there a blue square in the image?", "red")
FLAGGED_OUTPUT = ("What is in the picture?", "red")


@pytest.fixture(scope="module")
def start(model):
    """start(guard=None) -> a LiveServer for the tiny model (with this ServeGuard), stopped at the end."""
    import torch

    from lmmkit.serve.app import create_app

    servers: list[LiveServer] = []

    def run(guard: ServeGuard | None = None) -> LiveServer:
        old = torch.get_num_threads()
        torch.set_num_threads(1)  # the batcher's worker takes the creating thread's setting
        try:
            server = LiveServer(create_app(model, MODEL_NAME, limits=LIMITS, guard=guard)).start()
        finally:
            torch.set_num_threads(old)
        servers.append(server)
        return server

    yield run
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("guard") / "rules.txt"
    path.write_text(RULES)
    return path


def client_for(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def ask(client, question: str, color: str | None = None, **kw):
    msg = user_message(question, data_url(picture(color))) if color else {"role": "user", "content": question}
    return client.chat.completions.create(model=MODEL_NAME, messages=[msg], temperature=0, max_tokens=24, **kw)


def streamed(client, question: str, color: str | None = None, **kw) -> tuple[str, str, list]:
    chunks = list(ask(client, question, color, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks


def assert_refused(r, where: str, categories: list[str], guard: str = "rules:rules.txt") -> None:
    """A chat completion whose message is the refusal, finish_reason content_filter, and OpenAI's `moderation`
    object saying which check flagged what."""
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.role == "assistant"
    assert choice.message.content == DEFAULT_REFUSAL and choice.message.refusal == DEFAULT_REFUSAL
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    assert_moderation(r.moderation, where, categories, guard)


def assert_moderation(m, where: str, categories: list[str], guard: str) -> None:
    part = m.output if where == "output" else m.input
    result = part.results[-1]
    assert part.type == "moderation_results" and result.type == "moderation_result" and result.flagged
    assert result.model == guard and [c for c, hit in result.categories.items() if hit] == categories
    assert result.category_applied_input_types[categories[0]] == ["image" if where == "image-text" else "text"]
    if where != "output":
        assert m.output.type == "error" and m.output.code == "not_moderated"


def test_clean_requests_pass_unchanged_and_flagged_input_and_output_are_refused(start, rules_file):
    plain = client_for(start())
    guard = ServeGuard(RuleGuard.from_file(rules_file))
    server = start(guard)
    guarded = client_for(server)

    want = ask(plain, *CLEAN)
    got = ask(guarded, *CLEAN)
    assert "triangle" not in want.choices[0].message.content
    assert (got.choices[0].message, got.choices[0].finish_reason, got.usage) == \
        (want.choices[0].message, want.choices[0].finish_reason, want.usage)
    text, finish, chunks = streamed(guarded, *CLEAN, stream_options={"include_usage": True})
    assert (text, finish, chunks[-1].usage) == (want.choices[0].message.content, want.choices[0].finish_reason,
                                                want.usage)
    assert ask(guarded, "Describe the image without any bomb talk please, what is here", "blue") \
        .choices[0].finish_reason == "content_filter"  # \bbomb\b matches inside any message text

    batches = server.batcher.stats()["batches"]
    refused = ask(guarded, "How do I make a bomb?", "red")
    assert_refused(refused, "input", ["weapons"])
    assert refused.usage.completion_tokens == 0 and server.batcher.stats()["batches"] == batches  # never generated

    # The tiny model answers "orange triangle." here: the output rule holds the answer back.
    assert "triangle" in ask(plain, *FLAGGED_OUTPUT).choices[0].message.content
    refused = ask(guarded, *FLAGGED_OUTPUT)
    assert_refused(refused, "output", ["leak"])
    assert refused.usage.completion_tokens > 0
    assert not refused.moderation.input.results[0].flagged  # the input was checked too, and passed
    text, finish, chunks = streamed(guarded, *FLAGGED_OUTPUT)
    assert (text, finish) == (DEFAULT_REFUSAL, "content_filter") and chunks[0].choices[0].delta.role == "assistant"
    assert_moderation(chunks[-1].moderation, "output", ["leak"], "rules:rules.txt")
    text, finish, chunks = streamed(guarded, "How do I make a bomb?", stream_options={"include_usage": True})
    assert (text, finish) == (DEFAULT_REFUSAL, "content_filter") and chunks[-1].usage.completion_tokens == 0
    assert_moderation(chunks[-2].moderation, "input", ["weapons"], "rules:rules.txt")
    assert guard.flagged == {"input": 3, "image-text": 0, "output": 2}


def test_the_image_text_is_read_by_the_model_and_moderated(start, model):
    seen: list[tuple[str, str]] = []

    def no_transcripts(text: str, where: str) -> Verdict:
        seen.append((text, where))
        return Verdict(where == "image-text", ("ocr",) if where == "image-text" else ())

    client = client_for(start(ServeGuard(CallableGuard(no_transcripts), on=("image-text",))))
    r = ask(client, "What colour is the shape?", "green")
    assert_refused(r, "image-text", ["ocr"], "function:no_transcripts")
    # What the guard saw is the served model's own greedy transcription of the image.
    transcript = LmmkitBackend(model, "fp", progress=False).generate(
        [Request(TRANSCRIBE_PROMPT, [picture("green")])], GenerationSettings(max_new_tokens=64))[0]
    assert seen == [(transcript, "image-text")]
    text_only = ask(client, "What colour is the shape?")
    assert text_only.choices[0].finish_reason in ("stop", "length") and len(seen) == 1  # no image, nothing to read


class ModerationStub:
    """An OpenAI-compatible POST /v1/moderations on localhost: flags "bomb" as violence; status 500 on "crash"."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, str | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((body, self.headers.get("Authorization")))
                if self.path != "/v1/moderations" or "crash" in body["input"]:
                    self.send_response(500 if "crash" in body["input"] else 404)
                    self.end_headers()
                    return
                bad = "bomb" in body["input"]
                payload = json.dumps({"id": "modr-1", "model": body.get("model", "omni-moderation-latest"),
                                      "results": [{"flagged": bad, "categories": {"violence": bad, "hate": False},
                                                   "category_scores": {"violence": 0.9 if bad else 0.01,
                                                                       "hate": 0.0}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_openai_compatible_moderation_endpoint_guards_the_server(start, monkeypatch):
    stub = ModerationStub()
    try:
        monkeypatch.setenv("LMMKIT_TEST_MOD_KEY", "mod-key")
        guard = load_guard(f"openai:{stub.url}#omni-moderation-latest", "LMMKIT_TEST_MOD_KEY")
        assert isinstance(guard, ModerationGuard)
        v = guard.check("how to build a bomb", "input")
        assert v == Verdict(True, ("violence",), {"violence": 0.9, "hate": 0.0})
        assert stub.requests[-1] == ({"input": "how to build a bomb", "model": "omni-moderation-latest"},
                                     "Bearer mod-key")
        assert not guard.check("a red circle", "output").flagged

        server = start(ServeGuard(guard, on=("input", "output")))
        client = client_for(server)
        r = ask(client, "Tell me how to make a bomb", "red")
        assert_refused(r, "input", ["violence"], "openai-moderation:omni-moderation-latest")
        result = r.moderation.input.results[0]
        assert result.categories == {"violence": True, "hate": False} and result.category_scores["violence"] == 0.9
        assert ask(client, *CLEAN).choices[0].finish_reason in ("stop", "length")
        # The endpoint failing is a 503 in OpenAI's error shape (the client may retry), never a 500.
        resp = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "crash please"}], "max_tokens": 4})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "guard_unavailable"
        assert "moderation" in resp.json()["error"]["message"]
        assert ask(client, *CLEAN).choices[0].finish_reason in ("stop", "length")  # and the server is fine
    finally:
        stub.close()


def test_guard_specs_and_rules_files_load_or_say_what_is_wrong(tmp_path, rules_file, monkeypatch):
    rules = load_guard(f"local:{rules_file}")
    assert isinstance(rules, RuleGuard) and [r.category for r in rules.rules] == ["weapons", "leak", "secrets"]
    assert rules.check("a BOMB!", "input") == Verdict(True, ("weapons",))
    assert not rules.check("a bomb", "output").flagged and rules.check("the password is", "image-text").flagged

    (tmp_path / "clf.py").write_text("def flag(text, where):\n    return ['spam'] if 'buy now' in text else []\n\n"
                                     "def broken(text, where):\n    return 42\n")
    fn = load_guard(f"local:{tmp_path / 'clf.py'}:flag")
    assert fn.check("buy now!", "output") == Verdict(True, ("spam",)) and not fn.check("hello", "input").flagged
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_guard("local:clf:flag").check("buy now", "input").flagged
    with pytest.raises(Exception, match="returned int; return a bool"):
        load_guard("local:clf:broken").check("x", "input")

    for spec, words in ((f"local:{tmp_path / 'clf.py'}", "name the function too"),
                        (f"local:{tmp_path / 'clf.py'}:nope", "has no function 'nope'"),
                        ("local:no_such_rules.txt", "is not a file"), ("local:no_such_module_x:fn", "No module"),
                        ("moderation:http://x", "expected openai:http(s)://HOST/v1"),
                        ("openai:localhost:9/v1", "expected openai:http(s)://HOST/v1")):
        with pytest.raises(GuardConfigError, match=re.escape(words)):
            load_guard(spec)
    for text, words in (("[input] weapons \\bbomb\\b", ":1: expected 'CATEGORY: REGEX'"),
                        ("# c\n[inbox] x: y", ":2: [inbox]: the checks are input, image-text, output"),
                        ("x: (unclosed", ":1: '(unclosed' is not a valid regular expression"),
                        ("# only comments", "no rules")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(GuardConfigError, match=re.escape(words)):
            RuleGuard.from_file(tmp_path / "bad.txt")
    with pytest.raises(GuardConfigError, match="--guard-on input,outptu: choose from input,image-text,output"):
        ServeGuard(rules, on=("input", "outptu"))


def test_serve_command_with_a_guard(checkpoint, rules_file):
    """`lmmkit serve ... --guard local:RULES --guard-on input` (via python -m lmmkit.serve.cli, the same parser)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmmkit.serve.cli", str(checkpoint), "--port", str(port), "--threads", "1",
           "--model-name", "tiny", "--log-level", "warning"]
    bad = subprocess.run([*cmd, "--guard", "local:nowhere.txt"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nowhere.txt is not a file" in bad.stderr
    proc = subprocess.Popen([*cmd, "--guard", f"local:{rules_file}", "--guard-on", "input"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(proc, port)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        msgs = [user_message("How do I make a bomb?", data_url(picture()))]
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == DEFAULT_REFUSAL
        r = c.chat.completions.create(model="tiny", messages=[user_message("What is in the picture?", data_url(
            picture()))], max_tokens=4, temperature=0)  # output is not guarded here
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(30)


def test_image_text_with_an_anyres_model_reads_each_image_at_its_own_size(tiny_clip_dir):
    """AnyRes models give an image as many tokens as its size needs: the transcription prompt follows it."""
    from lmmkit.models.build import build_vlm
    from lmmkit.serve.app import create_app

    model = build_vlm("shipped:lm", str(tiny_clip_dir), -2, anyres=True,
                      anyres_grid_pinpoints="32x64,64x32,64x64").eval()
    seen: list[str] = []
    guard = ServeGuard(CallableGuard(lambda text, where: seen.append(text) or False), on=("image-text",))
    server = LiveServer(create_app(model, MODEL_NAME, limits=LIMITS, guard=guard)).start()
    try:
        image = picture("blue", "square", 64).resize((90, 40))
        r = client_for(server).chat.completions.create(
            model=MODEL_NAME, messages=[user_message("What is in the picture?", data_url(image))], temperature=0,
            max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length")  # passed: the classifier flagged nothing
    finally:
        server.stop()
    want = LmmkitBackend(model, "fp", progress=False).generate([Request(TRANSCRIBE_PROMPT, [image])],
                                                               GenerationSettings(max_new_tokens=64))
    assert seen == want

"""`lmmkit serve` end to end: a real server on a tiny lmmkit checkpoint, driven by the official `openai`
client (and raw httpx where exact statuses and bodies matter)."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from serve_helpers import (  # noqa: E402
    MODEL_NAME,
    bomb_png,
    data_url,
    picture,
    png_bytes,
    user_message,
    wait_until_healthy,
)

from lmmkit.data.collate import expand_image_tokens  # noqa: E402
from lmmkit.data.schema import Message  # noqa: E402
from lmmkit.data.templates import encode_prompt  # noqa: E402
from lmmkit.eval.backends.base import GenerationSettings, Request  # noqa: E402
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend  # noqa: E402
from lmmkit.eval.backends.openai_api import OpenAIBackend  # noqa: E402
from lmmkit.eval.generation import prompt_ids  # noqa: E402
from lmmkit.serve import images as serve_images  # noqa: E402

LIMITS = dict(max_image_bytes=300_000, max_image_pixels=2_000_000, max_images_per_request=3, max_tokens=64,
              default_max_tokens=32, max_request_bytes=2_000_000, batch_window_ms=100, max_batch_size=8)
QUESTION = "What is in the picture?"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(serve):
    return serve(**LIMITS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def ask(client, *messages, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=list(messages), **kw)


def post(server, body, headers=None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}/chat/completions", content=raw, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def assert_error(resp: httpx.Response, status: int, *words: str, code: str | None = None) -> dict:
    """An OpenAI-shaped error with this status whose message mentions each of `words`."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"] and err["type"], err
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err)
    if code:
        assert err["code"] == code, err
    return err


def test_plain_and_streamed_answers_agree_with_usage_counting_image_tokens(client, model):
    msg = user_message(QUESTION, data_url(picture("red")))
    r = ask(client, msg, temperature=0, max_tokens=32)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL_NAME
    chunks = list(ask(client, msg, temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage == r.usage and not chunks[-1].choices
    # Prompt tokens count the image's placeholder tokens: exactly what the model attends to.
    ids = prompt_ids(model, QUESTION)
    assert ids.count(model.image_token_id) == model.tokens_per_image
    assert r.usage.prompt_tokens == len(ids)
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text_only = ask(client, {"role": "user", "content": QUESTION}, temperature=0, max_tokens=4)
    assert text_only.usage.prompt_tokens == len(prompt_ids(model, QUESTION, with_image=False))
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens >= model.tokens_per_image


def test_answers_match_the_eval_harness_lmmkit_backend(server, model):
    """`lmmkit eval --model openai:URL#NAME` against the server == evaluating the checkpoint directly."""
    reqs = [Request(q, [picture(c, s)]) for q, c, s in [(QUESTION, "red", "circle"),
                                                       ("Is there a blue square in the image?", "blue", "square"),
                                                       ("What colour is the shape?", "green", "circle")]]
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    direct = LmmkitBackend(model, "fp", progress=False).generate(reqs, settings)
    served = OpenAIBackend(f"openai:{server.base_url}#{MODEL_NAME}", retries=0).generate(reqs, settings)
    assert served == direct and all(isinstance(a, str) and a for a in served)


def test_multi_turn_conversation_uses_the_chat_template(client, model):
    answer = ask(client, user_message(QUESTION, data_url(picture("red"))), temperature=0, max_tokens=8)
    first = answer.choices[0].message.content
    conversation = [{"role": "system", "content": "Answer briefly."},
                    user_message(QUESTION, data_url(picture("red"))),
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]}]
    r = ask(client, *conversation, temperature=0, max_tokens=8)
    expected = encode_prompt(model.tokenizer, [Message("system", "Answer briefly."),
                                               Message("user", f"<image>\n{QUESTION}"),
                                               Message("assistant", first),
                                               Message("user", "And what colour is it?")])
    expected, _ = expand_image_tokens(expected, expected, model.image_token_id, model.tokens_per_image)
    assert r.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, *conversation, user_message("And this one?", data_url(picture("blue"))), max_tokens=4)
    assert "one image per conversation" in err.value.message


def test_models_health_and_unknown_model(client, server):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and MODEL_NAME in err.value.message
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["auth"] is False
    assert_error(httpx.get(f"{server.url}/nowhere"), 404, "/nowhere", code="not_found")
    assert_error(httpx.get(f"{server.base_url}/chat/completions"), 405, code="method_not_allowed")


def test_api_key_is_enforced(serve):
    server = serve(api_key="s3cret", **LIMITS)
    for key in ("wrong", "s3cre"):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0).models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    resp = httpx.get(f"{server.base_url}/models")
    assert assert_error(resp, 401, "missing API key", code="invalid_api_key")["type"] == "invalid_request_error"
    assert resp.headers["www-authenticate"] == "Bearer"
    assert_error(post(server, {"messages": [{"role": "user", "content": "hi"}]}), 401, code="invalid_api_key")
    good = openai.OpenAI(base_url=server.base_url, api_key="s3cret", max_retries=0)
    assert ask(good, {"role": "user", "content": "hi"}, max_tokens=2).choices[0].message is not None
    assert httpx.get(f"{server.url}/health").status_code == 200  # for load balancers: no key
    assert httpx.get(f"{server.url}/").status_code == 200  # the page asks for the key itself


def test_remote_image_urls_are_refused_by_default(server):
    resp = post(server, {"messages": [user_message(QUESTION, "https://example.com/cat.png")]})
    assert_error(resp, 400, "remote image URLs are disabled", "--allow-remote-images", code="remote_images_disabled")
    assert_error(post(server, {"messages": [user_message(QUESTION, "file:///etc/passwd")]}), 400,
                 code="invalid_image_url")


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.5.4", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("2002:7f00:1::", False), ("8.8.8.8", True), ("2606:4700:4700::1111", True)])
def test_only_public_addresses_are_fetched(address, allowed):
    assert serve_images.address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.fixture
def image_host():
    """A plain HTTP server on loopback: /ok.png, /big.png, and /hop redirecting to 127.0.0.2."""
    small, big = png_bytes(picture("blue")), png_bytes(noise(400))

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/ok.png")
                self.end_headers()
                return
            body = small if self.path == "/ok.png" else big
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_remote_images_when_allowed_never_reach_internal_addresses(serve, image_host, monkeypatch):
    server = serve(allow_remote_images=True, **LIMITS)
    for url in (f"{image_host}/ok.png", "http://169.254.169.254/latest/meta-data/", "http://localhost/x.png",
                "http://[::1]/x.png"):
        assert_error(post(server, {"messages": [user_message(QUESTION, url)]}), 400, "non-public address",
                     code="image_url_forbidden")
    # Pretend 127.0.0.1 is public to exercise the download itself; 127.0.0.2 stays internal, so a
    # redirect there is refused on its own hop.
    monkeypatch.setattr(serve_images, "address_allowed", lambda ip: str(ip) == "127.0.0.1")
    assert post(server, {"messages": [user_message(QUESTION, f"{image_host}/ok.png")], "max_tokens": 2}).is_success
    assert_error(post(server, {"messages": [user_message(QUESTION, f"{image_host}/big.png")]}), 413,
                 "limit of 300,000 bytes", code="image_too_large")
    assert_error(post(server, {"messages": [user_message(QUESTION, f"{image_host}/hop")]}), 400, "127.0.0.2",
                 code="image_url_forbidden")


def noise(side: int) -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


def test_limits_answer_clear_4xx_errors(server, client):
    big = data_url(noise(400))  # ~480 kB of incompressible PNG > 300 kB
    assert_error(post(server, {"messages": [user_message(QUESTION, big)]}), 413, "300,000 bytes",
                 code="image_too_large")
    assert_error(post(server, {"messages": [user_message(QUESTION, data_url(bomb_png(5000, 5000)))]}), 400,
                 "5000x5000 = 25,000,000 pixels", "limit of 2,000,000", code="image_too_many_pixels")
    # Past PIL's own guard, PIL refuses while opening; the answer is the same kind of error.
    assert_error(post(server, {"messages": [user_message(QUESTION, data_url(bomb_png()))]}), 400,
                 "3600000000 pixels", "decompression bomb", code="image_too_many_pixels")
    url = data_url(picture())
    assert_error(post(server, {"messages": [user_message(QUESTION, *[url] * 4)]}), 400, "the limit is 3",
                 code="too_many_images")
    assert_error(post(server, {"messages": [user_message(QUESTION, url, url)]}), 400, "one image per conversation")
    assert_error(post(server, {"messages": [user_message(QUESTION)], "max_tokens": 10**9}), 400,
                 "1,000,000,000", "limit of 64", code="max_tokens_too_large")
    long_text = "the cat sat on the mat " * 200
    assert_error(post(server, {"messages": [user_message(long_text)], "max_tokens": 8}), 400,
                 "context is 512 tokens", code="context_length_exceeded")
    assert_error(post(server, b"{" + b" " * 2_000_001 + b"}"), 413, "larger than the limit",
                 code="request_too_large")
    with pytest.raises(openai.BadRequestError) as err:  # what an openai client user sees
        ask(client, user_message(QUESTION), max_tokens=100_000)
    assert "more than this server's limit of 64" in err.value.message


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b"[]", "JSON object"),
    (b'"hello"', "JSON object"),
    ({}, "messages must be a non-empty array"),
    ({"messages": "hi"}, "messages must be a non-empty array"),
    ({"messages": [1]}, "messages[0] must be an object"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "type is text or image_url"),
    ({"messages": [user_message(QUESTION, 5)]}, "image_url.url must be a string"),
    ({"messages": [user_message(QUESTION, "data:image/png;base64,!!!")]}, "not valid base64"),
    ({"messages": [user_message(QUESTION, "data:text/plain,hello")]}, "data:image/"),
    ({"messages": [user_message(QUESTION, data_url(b"not an image at all"))]}, "not a recognised image"),
    ({"messages": [user_message(QUESTION, data_url(png_bytes(picture())[:200]))]}, "cannot decode"),
    ({"messages": [{"role": "user", "content": "<image>\nhi"}]}, "reserved image tag"),
    ({"messages": [user_message(QUESTION)], "temperature": "hot"}, "temperature must be a number"),
    ({"messages": [user_message(QUESTION)], "temperature": 7}, "between 0 and 2"),
    ({"messages": [user_message(QUESTION)], "top_p": 0}, "top_p"),
    ({"messages": [user_message(QUESTION)], "max_tokens": -1}, "at least 1"),
    ({"messages": [user_message(QUESTION)], "max_tokens": True}, "max_tokens must be an integer"),
    ({"messages": [user_message(QUESTION)], "max_tokens": "12"}, "max_tokens must be an integer"),
    ({"messages": [user_message(QUESTION)], "stream": "yes"}, "stream must be a boolean"),
    ({"messages": [user_message(QUESTION)], "stop": [1, 2]}, "stop must be"),
    ({"messages": [user_message(QUESTION)], "n": 3}, "n=1"),
    ({"messages": [user_message(QUESTION)], "model": 7}, "model must be a string"),
]


@pytest.mark.parametrize("body, words", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_request_is_a_4xx_in_openai_shape(server, body, words):
    assert_error(post(server, body), 400, words)


def test_malformed_requests_never_kill_the_server(server, client):
    for body, _ in MALFORMED:
        assert 400 <= post(server, body).status_code < 500
    assert_error(post(server, {"messages": [user_message(QUESTION)]}, {"Content-Type": "text/plain"}), 415,
                 "application/json", code="unsupported_media_type")
    assert_error(post(server, {"messages": [user_message(QUESTION, data_url(bomb_png()))]}), 400,
                 code="image_too_many_pixels")
    # A client that hangs up mid-stream costs the server nothing but that row.
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=30,
                      json={"messages": [user_message(QUESTION)], "stream": True, "max_tokens": 64}) as resp:
        next(resp.iter_lines())
    r = ask(client, user_message(QUESTION, data_url(picture("red"))), temperature=0, max_tokens=8)
    assert r.choices[0].message.content and server.health()["status"] == "ok"


def test_concurrent_requests_are_batched(server, client):
    before = server.batcher.stats()
    colours = ["red", "green", "blue", "orange", "purple", "yellow"]
    messages = [user_message(QUESTION, data_url(picture(c, "square", size=72))) for c in colours]
    messages += [user_message("Describe a red circle."), user_message("Is the sky blue?")]  # text only
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda m: ask(client, m, temperature=0, max_tokens=16), messages))
    assert all(r.choices[0].message.content for r in replies)
    after = server.batcher.stats()
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert sum(size * n for size, n in sizes.items()) == 8
    assert max(size for size, n in sizes.items() if n) > 1, sizes  # some requests were generated together
    assert after["images_encoded"] - before["images_encoded"] == 6
    # Batching changes nothing: each answer is the one the request gets alone (left padding is exact).
    alone = [ask(client, m, temperature=0, max_tokens=16) for m in messages]
    assert [r.choices[0].message.content for r in alone] == [r.choices[0].message.content for r in replies]
    assert [r.usage for r in alone] == [r.usage for r in replies]


def test_same_image_is_encoded_once(server, client):
    url = data_url(picture("teal", "square", size=80))
    before = server.batcher.stats()
    first = ask(client, user_message(QUESTION, url), temperature=0, max_tokens=8)
    second = ask(client, user_message("Describe the image.", url), temperature=0, max_tokens=8)
    with ThreadPoolExecutor(2) as pool:  # the same new image twice in one batch: still one encoding
        twins = list(pool.map(lambda _: ask(client, user_message(QUESTION, data_url(picture("navy"))),
                                            temperature=0, max_tokens=8), range(2)))
    after = server.batcher.stats()
    assert after["images_encoded"] - before["images_encoded"] == 2
    assert after["image_cache_hits"] - before["image_cache_hits"] >= 1
    assert first.choices[0].message.content and second.choices[0].message.content
    assert twins[0].choices[0].message.content == twins[1].choices[0].message.content


def test_stop_strings_end_the_answer_plain_and_streamed(client):
    msg = user_message(QUESTION, data_url(picture("red")))
    full = ask(client, msg, temperature=0, max_tokens=32).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[:full.find(stop)]
    r = ask(client, msg, temperature=0, max_tokens=32, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = ask(client, msg, temperature=0, max_tokens=32, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_sampling_with_a_seed_is_reproducible(client):
    msg = user_message(QUESTION, data_url(picture("red")))
    a, b = (ask(client, msg, temperature=1.0, top_p=0.9, seed=7, max_tokens=16).choices[0].message.content
            for _ in range(2))
    assert a == b
    r = ask(client, msg, temperature=1.0, max_tokens=3)
    assert r.usage.completion_tokens <= 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_the_server(checkpoint):
    """`lmmkit serve` (here via `python -m lmmkit.serve.cli`, the same parser and entry point)."""
    port = free_port()
    env = {**os.environ, "LMMKIT_TEST_KEY": "k-123"}
    cmd = [sys.executable, "-m", "lmmkit.serve.cli", str(checkpoint), "--port", str(port), "--threads", "1",
           "--model-name", "tiny", "--log-level", "warning"]
    missing = subprocess.run([*cmd, "--api-key-env", "LMMKIT_NO_SUCH_KEY"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert missing.returncode == 2 and "LMMKIT_NO_SUCH_KEY" in missing.stderr
    proc = subprocess.Popen([*cmd, "--api-key-env", "LMMKIT_TEST_KEY"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(proc, port)
        base = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{base}/models").status_code == 401
        c = openai.OpenAI(base_url=base, api_key="k-123", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[user_message(QUESTION, data_url(picture()))],
                                      max_tokens=4, temperature=0)
        assert r.model == "tiny" and r.usage.prompt_tokens > 64
    finally:
        proc.terminate()
        proc.wait(30)

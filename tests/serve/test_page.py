"""The chat page at /, in headless Chromium driven over the DevTools protocol: it streams an answer for
a built-in picture (?selftest=1), takes an uploaded image and a follow-up question, and says so
when the server wants an API key."""

from __future__ import annotations

import io
import os
import re

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from serve_helpers import CHROMIUM, MODEL_NAME, Chrome, picture  # noqa: E402

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM}")

DONE = "document.body.dataset.state === 'done' || document.body.dataset.state === 'error'"
ANSWERS = "[...document.querySelectorAll('.msg.assistant')].map((e) => e.innerText)"


@pytest.fixture(scope="module")
def server(serve):
    return serve(batch_window_ms=5)


@pytest.fixture
def chrome():
    browser = Chrome()
    yield browser
    browser.close()


def test_page_is_self_contained_and_locked_down(server):
    resp = httpx.get(f"{server.url}/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", resp.text)  # no external assets
    policy = resp.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_selftest_streams_the_same_answer_as_the_api(server, chrome):
    chrome.open(f"{server.url}/?selftest=1")
    assert chrome.wait_for(DONE) and chrome.js("document.body.dataset.state") == "done"
    answers = chrome.js(ANSWERS)
    assert len(answers) == 1 and answers[0].strip()
    assert chrome.js("document.querySelector('.msg.user').innerText").strip() == "What is in the picture?"
    assert chrome.js("document.getElementById('model').textContent") == MODEL_NAME
    # The page's picture through the API, not streamed: the same greedy answer.
    image = chrome.js("document.querySelector('.msg.user img').src")
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                     {"type": "text", "text": "What is in the picture?"}]}],
            "temperature": 0, "max_tokens": 64}
    api = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
    assert api["choices"][0]["message"]["content"] == answers[0]
    shot = Image.open(io.BytesIO(chrome.screenshot())).convert("RGB")
    colours = shot.getcolors(1 << 16)  # None: more than 65536 colours
    assert shot.width == 900 and shot.height > 500 and (colours is None or len(colours) > 20), colours  # not blank


def test_upload_then_follow_up_question(server, chrome, tmp_path):
    path = tmp_path / "shape.png"
    picture("green", "square", size=96).save(path)
    before = server.batcher.stats()
    chrome.open(f"{server.url}/")
    chrome.wait_for("document.readyState === 'complete'")
    chrome.set_files("#file", [str(path)])
    assert chrome.wait_for("document.getElementById('preview').src.startsWith('data:image/png')")
    for i, question in enumerate(["Is there a green square?", "What colour is it?"]):
        chrome.js(f"document.getElementById('question').value = {question!r}; "
                  "document.getElementById('form').requestSubmit()")
        chrome.wait_for(f"document.querySelectorAll('.msg.assistant').length === {i + 1} && ({DONE})")
        assert chrome.js("document.body.dataset.state") == "done"
    answers = chrome.js(ANSWERS)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    after = server.batcher.stats()
    # The follow-up re-sends the conversation, image included: the server encodes it once.
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert after["image_cache_hits"] - before["image_cache_hits"] >= 1


def test_page_reports_a_missing_api_key(serve, chrome):
    server = serve(api_key="page-key")
    chrome.open(f"{server.url}/?selftest=1")
    chrome.wait_for(DONE)
    assert chrome.js("document.body.dataset.state") == "error"
    assert "missing API key" in chrome.js("document.querySelector('.msg.error').innerText")

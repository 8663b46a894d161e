"""`lmmkit serve` with an AnyRes model: each image's prompt tokens follow its size, images of different sizes
are generated in one batch, and the answers are the eval harness's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from serve_helpers import MODEL_NAME, LiveServer, data_url, picture, user_message  # noqa: E402

from lmmkit.eval.backends.base import GenerationSettings, Request  # noqa: E402
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend  # noqa: E402
from lmmkit.eval.generation import prompt_ids  # noqa: E402
from lmmkit.models.build import build_vlm  # noqa: E402
from lmmkit.models.highres import anyres_token_count  # noqa: E402
from lmmkit.serve import ServeLimits  # noqa: E402

QUESTION = "What is in the picture?"
GRID = [(32, 64), (64, 32), (64, 64)]


@pytest.fixture(scope="module")
def anyres_model(tiny_clip_dir):
    return build_vlm("shipped:lm", str(tiny_clip_dir), -2, anyres=True,
                     anyres_grid_pinpoints="32x64,64x32,64x64").eval()


@pytest.fixture(scope="module")
def server(anyres_model):
    from lmmkit.serve.app import create_app

    app = create_app(anyres_model, MODEL_NAME, limits=ServeLimits(batch_window_ms=500, max_batch_size=8))
    live = LiveServer(app).start()
    yield live
    live.stop()


def _ask(server, image: Image.Image, question: str = QUESTION) -> dict:
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 8,
            "messages": [user_message(question, data_url(image))]}
    resp = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_image_requests_count_their_anyres_tokens_and_batch_across_sizes(server, anyres_model):
    images = [picture("red", "circle", 64), picture("blue", "square", 64).resize((90, 40)),
              picture("green", "circle", 64).resize((30, 100))]
    with ThreadPoolExecutor(3) as pool:  # sent together: generated as one batch of three token counts
        replies = list(pool.map(lambda im: _ask(server, im), images))
    for image, reply in zip(images, replies, strict=True):
        ids = prompt_ids(anyres_model, QUESTION, image=image)
        tokens = anyres_token_count((image.height, image.width), GRID, 32, 8)
        assert ids.count(anyres_model.image_token_id) == tokens
        assert reply["usage"]["prompt_tokens"] == len(ids)
    assert len({r["usage"]["prompt_tokens"] for r in replies}) == 3  # 88, 52 and 40 image tokens
    stats = server.batcher.stats()
    assert stats["images_encoded"] == 3 and stats["largest_batch"] >= 2, stats
    # The same answers as evaluating the model directly (one image each; greedy).
    direct = LmmkitBackend(anyres_model, "fp", progress=False).generate(
        [Request(QUESTION, [im]) for im in images], GenerationSettings(max_new_tokens=8, temperature=0.0))
    assert [r["choices"][0]["message"]["content"] for r in replies] == direct
    # A cached image (its features are in the server's LRU) still counts by its size.
    again = _ask(server, images[1])
    assert again["usage"]["prompt_tokens"] == replies[1]["usage"]["prompt_tokens"]
    assert server.batcher.stats()["image_cache_hits"] >= 1

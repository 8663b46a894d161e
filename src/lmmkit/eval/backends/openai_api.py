"""The harness backend for OpenAI-compatible chat endpoints (vLLM, lmmkit serve, hosted APIs).

`openai:http://host:8000/v1#model-name` names one; the API key comes from an environment
variable (OPENAI_API_KEY unless told otherwise), never from the command line. Images travel as
base64 data URLs. Requests run concurrently; a timeout, an HTTP error or a reply without a
message is retried with backoff and then reported as a BackendError in that request's slot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from lmmkit.eval.backends.base import BackendError, GenerationSettings, Request, cache_safe

PREFIX = "openai:"
RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


def parse_endpoint(spec: str) -> tuple[str, str]:
    """"openai:http://host:port/v1#model" -> (base URL, model name)."""
    if not spec.startswith(PREFIX) or "#" not in spec:
        raise ValueError(f"endpoint {spec!r}: expected openai:<base URL>#<model name>, "
                         "e.g. openai:http://localhost:8000/v1#llava-1.5-7b")
    url, model = spec[len(PREFIX):].rsplit("#", 1)
    if not url.startswith(("http://", "https://")) or not model:
        raise ValueError(f"endpoint {spec!r}: the URL must start with http:// or https:// and a model name "
                         "must follow '#'")
    return url.rstrip("/"), model


def image_data_url(image: Path | Image.Image) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    else:
        path = Path(image)
        data = path.read_bytes()
        mime = {".png": "image/png", ".gif": "image/gif", ".webp": "image/webp"}.get(path.suffix.lower(), "image/jpeg")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class OpenAIBackend:
    """POSTs each request to {base}/chat/completions."""

    def __init__(self, spec: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 3,
                 concurrency: int = 8, backoff: float = 1.0) -> None:
        self.base_url, self.model = parse_endpoint(spec)
        self.name = f"openai:{self.model}"
        self.api_key = os.environ.get(api_key_env, "")
        self.timeout, self.retries, self.concurrency, self.backoff = timeout, retries, concurrency, backoff

    def fingerprint(self) -> str:
        return cache_safe(f"{self.base_url}#{self.model}")

    def _payload(self, r: Request, settings: GenerationSettings) -> dict:
        content: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in r.images]
        content.append({"type": "text", "text": r.prompt})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature}

    def complete(self, payload: dict) -> str:
        """One chat completion, retried on timeouts and retryable HTTP errors."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {err.read()[:200].decode(errors='replace')}"
                if err.code in RETRYABLE:
                    continue
                raise BackendError(f"{self.base_url}: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                text = json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise BackendError(f"{self.base_url}: reply is not a chat completion: {raw[:200]!r}") from None
            if not isinstance(text, str):
                raise BackendError(f"{self.base_url}: reply's message content is {type(text).__name__}, not text")
            return text
        raise BackendError(f"{self.base_url}: no answer after {self.retries + 1} tries ({last})")

    def _one(self, r: Request, settings: GenerationSettings) -> str | BackendError:
        try:
            return self.complete(self._payload(r, settings)).strip()
        except BackendError as err:
            return err
        except OSError as err:  # an image file that cannot be read
            return BackendError(f"cannot read image: {err}")

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, settings), requests))

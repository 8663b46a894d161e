"""A real OpenAI-compatible HTTP server on localhost for tests (chat completions only).

Its answers come from a Python callable the test supplies, so tests can check exactly what the
harness sent (prompt text, images as data URLs) and what it does with timeouts, HTTP errors and
garbage replies. It is a real server on a real socket: the client code under test is unchanged.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    """`answer(model, prompt, images: list[bytes], temperature) -> str | dict`; a dict is sent raw:
    {"status": 503} for an HTTP error, {"sleep": s} to stall, {"raw": b"..."} for a garbage body."""

    def __init__(self, answer: Callable[[str, str, list[bytes], float], object]) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        self.api_keys: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.api_keys.append(self.headers.get("Authorization"))
                content = body["messages"][-1]["content"]
                if isinstance(content, str):
                    content = [{"type": "text", "text": content}]
                text = "".join(c["text"] for c in content if c["type"] == "text")
                images = [base64.b64decode(c["image_url"]["url"].split(",", 1)[1])
                          for c in content if c["type"] == "image_url"]
                out = stub.answer(body["model"], text, images, body.get("temperature", 1.0))
                if isinstance(out, dict) and "sleep" in out:
                    time.sleep(out["sleep"])
                    out = out.get("then", "late")
                if isinstance(out, dict) and "status" in out:
                    self.send_response(out["status"])
                    self.end_headers()
                    self.wfile.write(b'{"error": "stub"}')
                    return
                if isinstance(out, dict) and "raw" in out:
                    payload = out["raw"]
                else:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": out}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

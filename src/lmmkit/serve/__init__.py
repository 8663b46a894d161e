"""`lmmkit serve`: an OpenAI-compatible chat server for lmmkit checkpoints.

This module stays free of web dependencies (FastAPI, uvicorn) so that `lmmkit --help` works
without them; the app lives in lmmkit.serve.app, the batching worker in lmmkit.serve.batcher.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how requests are batched. Every limit answers a clear 4xx."""

    max_request_bytes: int = 60_000_000  # whole JSON body: room for a few base64 images
    max_image_bytes: int = 10_000_000  # one image, decoded from base64 or downloaded
    max_image_pixels: int = 16_000_000  # width x height, checked from the header before decoding
    max_images_per_request: int = 4
    max_tokens: int = 512  # upper bound on max_tokens; also capped by the model's context
    default_max_tokens: int = 256  # when the request names none
    max_messages: int = 256
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    max_batch_size: int = 16
    batch_window_ms: float = 10.0  # how long the worker waits for more requests to join a batch
    max_queue: int = 256  # waiting requests beyond this get 503
    image_cache_size: int = 256  # encoded images kept (LRU, keyed by the bytes' sha256)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


__all__ = ["APIError", "ServeLimits"]

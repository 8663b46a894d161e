"""The HTTP side of `lmmkit serve`: OpenAI's chat completions (plain and streamed as server-sent
events), /v1/models, /health and a chat page at /, over the batching worker.

Request handlers never touch the model: they validate (in a worker thread, since decoding
images and tokenizing are CPU work that would stall the event loop), queue a Job, and relay the
text the generation thread sends back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.serve import APIError, ServeLimits
from lmmkit.serve.batcher import Batcher, Job, collect
from lmmkit.serve.guard import ServeGuard
from lmmkit.serve.protocol import ChatRequest, parse_chat_request

logger = logging.getLogger("lmmkit.serve")
PAGE = Path(__file__).with_name("page.html")


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def page_and_policy() -> tuple[str, str]:
    """The chat page, and a Content-Security-Policy that allows its own inline script and nothing else."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


def create_app(model: VisionLanguageModel, model_name: str, api_key: str | None = None,
               limits: ServeLimits | None = None, guard: ServeGuard | None = None) -> FastAPI:
    """A FastAPI app serving `model` as `model_name`; with `api_key`, /v1/* needs `Authorization: Bearer`;
    with `guard`, requests and answers are moderated (lmmkit.serve.guard)."""
    limits = limits or ServeLimits()
    batcher = Batcher(model, limits)
    page, policy = page_and_policy()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    # No generated docs: they would load scripts from a CDN, and this API is OpenAI's, documented there.
    app = FastAPI(title="lmmkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.guard = guard

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                       code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error", code="internal_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")
        # Constant-time comparison: response timing must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "lmmkit"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "generation worker stopped", "model": model_name,
                             "auth": api_key is not None, **batcher.stats()}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict:
        authorize(request)
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist here; this server serves {model_name!r}",
                           code="model_not_found", param="model")
        return card

    def prepare(raw: bytes) -> ChatRequest:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}"[:300], code="invalid_json") from None
        return parse_chat_request(body, model, model_name, limits, batcher.features.__contains__)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        raw = await read_body(request, limits.max_request_bytes)
        req = await run_in_threadpool(prepare, raw)
        if guard is not None:
            reply = Reply(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model_name, len(req.prompt_ids))
            if (guarded := await guard.respond(raw, req, reply, batcher)) is not None:
                return guarded  # a refusal, or an answer held back until it was checked
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req.prompt_ids, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), req.max_tokens,
                  req.temperature, req.top_p, req.stop, req.seed, req.image_sha, req.image, req.image_bytes,
                  image_size=req.image_size)
        reply = Reply(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model_name, len(req.prompt_ids))
        if req.stream:
            batcher.submit(job)
            return StreamingResponse(reply.stream(events, job, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(reply.completion(*await collect(batcher, job)))

    return app


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused early when not JSON or larger than the limit (checked as it arrives)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Also keeps other web pages from posting here: a cross-origin JSON POST needs a CORS preflight.
        raise APIError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is larger than the limit of {max_bytes:,} bytes",
                       code="request_too_large")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


class Reply:
    """OpenAI's response objects for one completion."""

    def __init__(self, cid: str, created: int, model: str, prompt_tokens: int) -> None:
        self.cid, self.created, self.model, self.prompt_tokens = cid, created, model, prompt_tokens

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        return {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(completion_tokens)}

    def chunk(self, delta: dict, finish_reason: str | None = None, include_usage: bool = False) -> str:
        body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return sse(body)

    async def stream(self, events: asyncio.Queue, job: Job, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield self.chunk({"role": "assistant", "content": ""}, include_usage=include_usage)
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield self.chunk({"content": event[1]}, include_usage=include_usage)
                    continue
                if event[0] == "done":
                    yield self.chunk({}, event[1], include_usage)
                    if include_usage:
                        yield sse({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                                   "model": self.model, "choices": [], "usage": self.usage(event[2])})
                else:  # the stream has begun (status 200): the error travels as an event
                    yield sse(APIError(500, event[1], code="generation_failed").body())
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # also when the client disconnects mid-stream: the worker drops the row


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

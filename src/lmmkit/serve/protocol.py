"""OpenAI chat requests -> what the batcher needs: validated field by field, the conversation rendered
with the model's chat template, the image fetched and decoded, every limit applied.

Validation is by hand rather than through pydantic so that each refusal is one sentence naming
the field (`messages[1].content[0].image_url.url ...`) in OpenAI's error shape.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from lmmkit import IMAGE_TOKEN
from lmmkit.data.collate import expand_image_tokens
from lmmkit.data.schema import Message
from lmmkit.data.templates import encode_prompt
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.serve import APIError, ServeLimits
from lmmkit.serve.images import image_bytes, open_image

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # as OpenAI's API
CHARS_PER_TOKEN_BOUND = 64  # text longer than context x this cannot fit: refused before tokenizing


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    image_sha: str | None = None
    image: Image.Image | None = None  # None when the features are cached already
    image_bytes: bytes | None = None
    image_size: tuple[int, int] | None = None  # (height, width); set when the model packs by size (AnyRes)


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, code=code, param=param)


def context_length(model: VisionLanguageModel) -> int:
    return int(getattr(model.llm.config, "max_position_embeddings", None) or 2**31)


def parse_chat_request(body: object, model: VisionLanguageModel, model_name: str, limits: ServeLimits,
                       is_cached: Callable[[str], bool] = lambda _: False) -> ChatRequest:
    """Everything a chat completion needs, or an APIError saying which field is wrong and why."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise bad("model must be a string", "model")
    if name is not None and name != model_name:
        raise bad(f"model {name!r} does not exist here; this server serves {model_name!r}", "model",
                  "model_not_found", 404)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad("only n=1 is supported", "n")
    if body.get("logprobs") or body.get("tools") or body.get("functions"):
        unsupported = [k for k in ("logprobs", "tools", "functions") if body.get(k)]
        raise bad(f"{', '.join(unsupported)} not supported by lmmkit serve", unsupported[0])
    messages, urls = parse_messages(body.get("messages"), limits)
    if len(urls) > limits.max_images_per_request:
        raise bad(f"too many images: this request has {len(urls)}, the limit is {limits.max_images_per_request} "
                  "per request", "messages", "too_many_images")
    if len(urls) > 1:
        raise bad(f"lmmkit models take one image per conversation; this request has {len(urls)}. Send one image, "
                  "or start a new conversation for the next", "messages", "too_many_images")

    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None) or {}
    include_usage = bool(options.get("include_usage", False))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise bad("top_p must be greater than 0", "top_p")
    seed = _typed(body, "seed", int, None)
    stop = _stop(body.get("stop"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, key, int, None)
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"{key} must be at least 1", key)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(f"{key} is {max_tokens:,}, more than this server's limit of {limits.max_tokens:,}", key,
                  "max_tokens_too_large")

    ctx = context_length(model)
    if sum(len(m.content) for m in messages) > ctx * CHARS_PER_TOKEN_BOUND:
        raise bad(f"the conversation is far longer than the model's context of {ctx} tokens", "messages",
                  "context_length_exceeded")
    try:
        ids = encode_prompt(model.tokenizer, messages)
    except Exception as err:  # a template may raise on role orders it does not support
        raise bad(f"the model's chat template cannot render this conversation: {err}", "messages") from None
    if ids.count(model.image_token_id) != len(urls):
        raise bad("the conversation's text produced image placeholder tokens of its own; remove them", "messages")
    fetched = None
    if urls and model.variable_tokens:  # the image's size sets its token count: fetch and decode it first
        fetched = _fetch(urls[0], limits, is_cached, decode=True)
    counts = model.image_token_counts([fetched[2]]) if fetched else [model.tokens_per_image] * len(urls)
    ids, _ = expand_image_tokens(ids, ids, model.image_token_id, counts)
    room = ctx - len(ids)
    image_note = f" (including {sum(counts)} for the image)" if urls else ""
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise bad(f"this model's context is {ctx} tokens; the prompt takes {len(ids)}{image_note} and "
                  f"{key} asks for {max_tokens or 1} more", "messages", "context_length_exceeded")
    req = ChatRequest(ids, max_tokens or min(limits.default_max_tokens, limits.max_tokens, room), temperature,
                      top_p, stop, seed, stream, include_usage)
    if urls:  # last for fixed-count models: fetching and decoding are the expensive steps
        req.image_bytes, req.image_sha, req.image = fetched or _fetch(urls[0], limits, is_cached)
        if fetched:
            req.image_size = (req.image.height, req.image.width)
    return req


def _fetch(url_param: tuple[str, str], limits: ServeLimits, is_cached: Callable[[str], bool],
           decode: bool = False) -> tuple[bytes, str, Image.Image | None]:
    """The image's bytes, sha256, and the decoded image (None when its features are cached, unless `decode`)."""
    url, param = url_param
    data = image_bytes(url, limits, param)
    sha = hashlib.sha256(data).hexdigest()
    image = open_image(data, limits.max_image_pixels, param) if decode or not is_cached(sha) else None
    return data, sha, image


def parse_messages(raw: object, limits: ServeLimits) -> tuple[list[Message], list[tuple[str, str]]]:
    """Messages with each image replaced by the image tag, and the image URLs with their field names."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array of messages", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"{len(raw)} messages, more than the limit of {limits.max_messages}", "messages")
    out: list[Message] = []
    urls: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            text = ""
        elif isinstance(content, str):
            text = _plain(content, f"{where}.content")
        elif isinstance(content, list):
            pieces = []
            for k, part in enumerate(content):
                p = f"{where}.content[{k}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"{p}.text must be a string", f"{p}.text")
                    pieces.append(_plain(part["text"], f"{p}.text"))
                elif kind == "image_url":
                    if role != "user":
                        raise bad(f"{p}: images are accepted in user messages only", p)
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if not isinstance(url, str):
                        raise bad(f"{p}.image_url.url must be a string (a data URL)", f"{p}.image_url.url")
                    urls.append((url, f"{p}.image_url.url"))
                    pieces.append(IMAGE_TOKEN)
                else:
                    raise bad(f"{p} must be an object whose type is text or image_url; got {kind!r}", p)
            # Image first then text renders "<image>\nquestion", exactly as lmmkit trains and evaluates.
            text = "\n".join(pieces)
        else:
            raise bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")
        out.append(Message(ROLES[role], text))
    return out, urls


def _plain(text: str, param: str) -> str:
    if IMAGE_TOKEN in text:
        raise bad(f"{param} contains the reserved image tag {IMAGE_TOKEN!r}; send images as image_url parts",
                  param)
    return text


def _typed(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    # bool is an int subclass: max_tokens=true is a mistake, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {int: "an integer", bool: "a boolean", dict: "an object"}
        raise bad(f"{key} must be {names.get(kind, kind.__name__)}; got {type(value).__name__}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"{key} must be a number; got {value!r}"[:200], key)
    if not low <= value <= high:
        raise bad(f"{key} must be between {low:g} and {high:g}; got {value:g}", key)
    return float(value)


def _stop(value: object) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or an array of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings; got {len(stops)}", "stop")
    return stops

"""`lmmkit serve --guard SPEC`: a moderation step on the incoming text, on the text the model reads from
the image, and on the outgoing answer. A flagged request is answered with a normal chat completion (or
SSE stream) whose message is a refusal and whose finish_reason is "content_filter", as OpenAI's is.

A guard is anything with `check(text, where) -> Verdict`: an OpenAI-compatible /v1/moderations endpoint
(`openai:URL[#model]`), a rules file of regular expressions (`local:RULES.txt`), or a Python function
(`local:FILE.py:NAME` or `local:package.module:NAME`). docs/safety.md describes each.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmmkit.serve import APIError

if TYPE_CHECKING:  # the web side is imported only when serving
    from fastapi.responses import Response

    from lmmkit.serve.app import Reply
    from lmmkit.serve.batcher import Batcher, Job
    from lmmkit.serve.protocol import ChatRequest

logger = logging.getLogger("lmmkit.serve")

WHERES: tuple[str, ...] = ("input", "image-text", "output")
DEFAULT_REFUSAL = "Sorry, I can't help with that request."
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # as the unguarded stream's
# The image's text comes from the served model itself: one short, greedy extra generation.
TRANSCRIBE_PROMPT = "Transcribe any text you can read in the image, exactly. If there is none, answer: none."


class GuardError(RuntimeError):
    """The moderation step could not give a verdict (endpoint down, bad reply, classifier error)."""


class GuardConfigError(ValueError):
    """A --guard spec or rules file that cannot be used; says what is wrong and what to write instead."""


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: tuple[str, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)


class Guard(Protocol):
    name: str

    def check(self, text: str, where: str) -> Verdict:
        """Moderate `text`; `where` is one of WHERES."""
        ...


@dataclass(frozen=True)
class Rule:
    category: str
    pattern: re.Pattern
    wheres: tuple[str, ...] = WHERES


class RuleGuard:
    """Regular expressions from a file (searched case-insensitively); one line per rule:

        CATEGORY: REGEX                  # every check
        [input,output] CATEGORY: REGEX   # only these checks
    Blank lines and lines starting with # are ignored.
    """

    def __init__(self, rules: Iterable[Rule], name: str = "rules") -> None:
        self.rules = list(rules)
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path) -> RuleGuard:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise GuardConfigError(f"guard rules {path}: cannot read it ({err.strerror or err})") from None
        rules = []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            wheres = WHERES
            if m := re.match(r"\[([^\]]*)\]\s*", line):
                wheres = tuple(w.strip() for w in m.group(1).split(",") if w.strip())
                if not wheres or set(wheres) - set(WHERES):
                    raise GuardConfigError(f"{path}:{n}: [{m.group(1)}]: the checks are {', '.join(WHERES)}")
                line = line[m.end():]
            category, sep, pattern = line.partition(":")
            if not sep or not category.strip() or not pattern.strip():
                raise GuardConfigError(f"{path}:{n}: expected 'CATEGORY: REGEX' (optionally after [input,...]), "
                                       f"got {raw.strip()!r}")
            try:
                compiled = re.compile(pattern.strip(), re.IGNORECASE)
            except re.error as err:
                raise GuardConfigError(f"{path}:{n}: {pattern.strip()!r} is not a valid regular expression: "
                                       f"{err}") from None
            rules.append(Rule(category.strip(), compiled, wheres))
        if not rules:
            raise GuardConfigError(f"{path}: no rules (write lines like 'violence: \\bbomb\\b')")
        return cls(rules, name=f"rules:{path.name}")

    def check(self, text: str, where: str) -> Verdict:
        hits = tuple(dict.fromkeys(r.category for r in self.rules if where in r.wheres and r.pattern.search(text)))
        return Verdict(bool(hits), hits)


class CallableGuard:
    """A Python function `fn(text, where)` returning a bool, a Verdict, a dict {flagged, categories,
    category_scores} (the moderation shape) or a list of flagged categories."""

    def __init__(self, fn: Callable[[str, str], Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or f"function:{getattr(fn, '__name__', 'classifier')}"

    def check(self, text: str, where: str) -> Verdict:
        return as_verdict(self.fn(text, where), self.name)


def as_verdict(out: object, source: str) -> Verdict:
    """A classifier's answer in any of the accepted shapes, as a Verdict."""
    if isinstance(out, Verdict):
        return out
    if isinstance(out, bool):
        return Verdict(out)
    if isinstance(out, Mapping) and "flagged" in out:
        cats = out.get("categories") or ()
        names = [k for k, v in cats.items() if v] if isinstance(cats, Mapping) else [str(c) for c in cats]
        return Verdict(bool(out["flagged"]), tuple(names), dict(out.get("category_scores") or {}))
    if isinstance(out, list | tuple | set | frozenset) and all(isinstance(c, str) for c in out):
        return Verdict(bool(out), tuple(out))
    raise GuardError(f"{source} returned {type(out).__name__}; return a bool, a Verdict, a list of flagged "
                     "categories or a dict with 'flagged'")


class ModerationGuard:
    """POSTs {"model", "input"} to an OpenAI-compatible {base}/moderations and reads results[0]'s flagged,
    categories and category_scores. The API key comes from an environment variable, never the command line."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.url = url if url.rstrip("/").endswith("/moderations") else url.rstrip("/") + "/moderations"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.name = f"openai-moderation:{model or 'default'}"

    def check(self, text: str, where: str) -> Verdict:
        body = {"input": text, **({"model": self.model} if self.model else {})}
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise GuardError(f"moderation endpoint {self.url}: HTTP {err.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise GuardError(f"moderation endpoint {self.url}: {getattr(err, 'reason', err)}") from None
        except ValueError:
            raise GuardError(f"moderation endpoint {self.url}: the reply is not JSON") from None
        results = reply.get("results") if isinstance(reply, dict) else None
        if not isinstance(results, list) or not results or not isinstance(results[0], dict) \
                or not isinstance(results[0].get("flagged"), bool):
            raise GuardError(f"moderation endpoint {self.url}: the reply has no results[0].flagged")
        return as_verdict(results[0], self.name)


def load_guard(spec: str, api_key_env: str | None = "OPENAI_API_KEY") -> Guard:
    """A guard from `openai:URL[#model]`, `local:RULES_FILE`, `local:FILE.py:NAME` or `local:module:NAME`."""
    kind, _, rest = spec.partition(":")
    if kind == "openai" and rest.startswith(("http://", "https://")):
        url, _, model = rest.partition("#")
        return ModerationGuard(url, model or None, os.environ.get(api_key_env or "", "") or None)
    if kind == "local" and rest:
        if m := re.fullmatch(r"(.+\.py):(\w+)", rest):
            return CallableGuard(_from_file(Path(m.group(1)), m.group(2)))
        if Path(rest).is_file():
            if rest.endswith(".py"):
                raise GuardConfigError(f"--guard {spec}: name the function too: local:{rest}:FUNCTION")
            return RuleGuard.from_file(rest)
        if m := re.fullmatch(r"([\w.]+):(\w+)", rest):
            return CallableGuard(_from_module(m.group(1), m.group(2)))
        raise GuardConfigError(f"--guard {spec}: {rest} is not a file (a rules file), FILE.py:FUNCTION or "
                               "module:FUNCTION")
    raise GuardConfigError(f"--guard {spec!r}: expected openai:http(s)://HOST/v1[#MODEL] (a moderation endpoint), "
                           "local:RULES_FILE, local:FILE.py:FUNCTION or local:package.module:FUNCTION")


def _from_file(path: Path, name: str) -> Callable:
    if not path.is_file():
        raise GuardConfigError(f"guard function file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"lmmkit_guard_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:
        raise GuardConfigError(f"guard function file {path} failed to load: {type(err).__name__}: {err}") from None
    return _callable(module, name, str(path))


def _from_module(module_name: str, name: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise GuardConfigError(f"guard module {module_name}: {err}") from None
    return _callable(module, name, module_name)


def _callable(module: object, name: str, where: str) -> Callable:
    fn = getattr(module, name, None)
    if not callable(fn):
        raise GuardConfigError(f"{where} has no function {name!r}")
    return fn


class ServeGuard:
    """The guard as the server runs it: which checks are on, the refusal, and the guarded request flow."""

    def __init__(self, guard: Guard, on: Iterable[str] = WHERES, refusal: str = DEFAULT_REFUSAL,
                 transcribe_tokens: int = 64) -> None:
        self.guard, self.on = guard, tuple(on)
        bad = set(self.on) - set(WHERES)
        if not self.on or bad:
            raise GuardConfigError(f"--guard-on {','.join(self.on)}: choose from {','.join(WHERES)}")
        self.refusal, self.transcribe_tokens = refusal, transcribe_tokens
        self.flagged: dict[str, int] = dict.fromkeys(WHERES, 0)  # refusals so far, by check

    async def check(self, text: str, where: str) -> Verdict:
        from starlette.concurrency import run_in_threadpool

        try:  # endpoints block and classifiers may be slow: never on the event loop
            return await run_in_threadpool(self.guard.check, text, where)
        except Exception as err:
            logger.warning("guard %s failed on %s: %s", self.guard.name, where, err)
            raise APIError(503, f"the moderation step ({self.guard.name}) failed: {err}; retry shortly",
                           code="guard_unavailable") from None

    async def respond(self, raw: bytes, req: ChatRequest, reply: Reply, batcher: Batcher) -> Response | None:
        """A refusal, the checked answer when the output is guarded, or None: generate as without a guard."""
        # Imported here, not at the top: `lmmkit serve --help` stays free of torch.
        from lmmkit.serve.batcher import collect

        inputs: list[tuple[Verdict, str]] = []  # (verdict, modality) of each input check made
        if "input" in self.on:
            inputs.append((await self.check(input_text(raw), "input"), "text"))
            if inputs[-1][0].flagged:
                return self.refuse(req, reply, "input", inputs, None, 0)
        if "image-text" in self.on and req.image_sha is not None:
            text, _, _ = await collect(batcher, self.transcribe_job(batcher, req))
            inputs.append((await self.check(text, "image-text"), "image"))
            if inputs[-1][0].flagged:
                return self.refuse(req, reply, "image-text", inputs, None, 0)
        if "output" not in self.on:
            return None
        deltas: list[str] = []
        text, finish, tokens = await collect(batcher, job_for(req), deltas)
        if (v := await self.check(text, "output")).flagged:
            return self.refuse(req, reply, "output", inputs, v, tokens)
        # The answer is sent only once checked: a stream replays its deltas after the check.
        return respond_with(req, reply, deltas, finish, tokens)

    def transcribe_job(self, batcher: Batcher, req: ChatRequest) -> Job:
        from lmmkit import IMAGE_TOKEN
        from lmmkit.data.collate import expand_image_tokens
        from lmmkit.data.schema import Message
        from lmmkit.data.templates import encode_prompt
        from lmmkit.serve.batcher import Job
        from lmmkit.serve.protocol import context_length

        model = batcher.model
        ids = encode_prompt(model.tokenizer, [Message("user", f"{IMAGE_TOKEN}\n{TRANSCRIBE_PROMPT}")])
        ids, _ = expand_image_tokens(ids, ids, model.image_token_id, model.image_token_counts([req.image]))
        room = max(1, context_length(model) - len(ids))
        return Job(ids, lambda ev: None, min(self.transcribe_tokens, room), 0.0, 1.0, [], None, req.image_sha,
                   req.image, req.image_bytes, image_size=req.image_size)

    def moderation(self, inputs: list[tuple[Verdict, str]], output: Verdict | None) -> dict:
        """OpenAI's `moderation` object of a chat completion: {input, output}, each results or an error."""
        def results(checked: list[tuple[Verdict, str]]) -> dict:
            return {"type": "moderation_results", "model": self.guard.name,
                    "results": [moderation_result(v, modality, self.guard.name) for v, modality in checked]}

        def skipped(why: str) -> dict:
            return {"type": "error", "code": "not_moderated", "message": why}
        return {"input": results(inputs) if inputs else skipped("this server's guard does not check the input"),
                "output": skipped("the input was refused: no answer was generated") if output is None
                else results([(output, "text")])}

    def refuse(self, req: ChatRequest, reply: Reply, where: str, inputs: list[tuple[Verdict, str]],
               output: Verdict | None, tokens: int) -> Response:
        from fastapi.responses import JSONResponse, StreamingResponse

        self.flagged[where] += 1
        verdict = output if where == "output" else inputs[-1][0]
        logger.info("guard %s refused a request at %s (%s)", self.guard.name, where,
                    ", ".join(verdict.categories) or "flagged")
        moderation = self.moderation(inputs, output)
        if req.stream:
            return StreamingResponse(replay(reply, [self.refusal], "content_filter", tokens, req.include_usage,
                                            moderation), media_type="text/event-stream", headers=SSE_HEADERS)
        body = reply.completion(self.refusal, "content_filter", tokens)
        body["choices"][0]["message"]["refusal"] = self.refusal  # OpenAI's field for a declined request
        body["moderation"] = moderation
        return JSONResponse(body)


def moderation_result(verdict: Verdict, modality: str, model: str) -> dict:
    """One result in OpenAI's shape; a rule's flagged category scores 1.0 (rules have no scores)."""
    cats = {c: True for c in verdict.categories}
    cats.update({c: False for c in verdict.scores if c not in cats})
    return {"type": "moderation_result", "model": model, "flagged": verdict.flagged, "categories": cats,
            "category_scores": {c: float(verdict.scores.get(c, 1.0 if hit else 0.0)) for c, hit in cats.items()},
            "category_applied_input_types": {c: [modality] for c in cats}}


def input_text(raw: bytes) -> str:
    """Every message's text (parts joined by newlines): earlier turns can carry what the last one asks for."""
    texts = []
    for m in json.loads(raw)["messages"]:
        content = m.get("content")
        parts = [content] if isinstance(content, str) else [
            p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"]
        texts.append("\n".join(parts))
    return "\n".join(t for t in texts if t)


def job_for(req: ChatRequest) -> Job:
    from lmmkit.serve.batcher import Job

    return Job(req.prompt_ids, lambda ev: None, req.max_tokens, req.temperature, req.top_p, req.stop, req.seed,
               req.image_sha, req.image, req.image_bytes, image_size=req.image_size)


def respond_with(req: ChatRequest, reply: Reply, deltas: list[str], finish: str, tokens: int) -> Response:
    from fastapi.responses import JSONResponse, StreamingResponse

    if req.stream:
        return StreamingResponse(replay(reply, deltas, finish, tokens, req.include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(reply.completion("".join(deltas), finish, tokens))


async def replay(reply: Reply, deltas: list[str], finish: str, tokens: int, include_usage: bool,
                 moderation: dict | None = None):
    """The stream a client would have seen: role chunk, content chunks, finish chunk (carrying the moderation
    object of a refusal), usage, [DONE]."""
    from lmmkit.serve.app import sse

    yield reply.chunk({"role": "assistant", "content": ""}, include_usage=include_usage)
    for d in deltas:
        yield reply.chunk({"content": d}, include_usage=include_usage)
    last = reply.chunk({}, finish, include_usage)
    if moderation is not None:
        body = json.loads(last.removeprefix("data: "))
        last = sse({**body, "moderation": moderation})
    yield last
    if include_usage:
        yield sse({"id": reply.cid, "object": "chat.completion.chunk", "created": reply.created,
                   "model": reply.model, "choices": [], "usage": reply.usage(tokens)})
    yield "data: [DONE]\n\n"


def add_guard_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("moderation (docs/safety.md)")
    g.add_argument("--guard", metavar="SPEC",
                   help="moderate requests and answers: openai:http(s)://HOST/v1[#MODEL] (a /moderations endpoint), "
                        "local:RULES_FILE (regular expressions), local:FILE.py:FUNCTION or local:module:FUNCTION")
    g.add_argument("--guard-on", default=",".join(WHERES), metavar="CHECKS",
                   help=f"which texts the guard checks, comma-separated (default {','.join(WHERES)}); image-text "
                        "asks the model to transcribe the image's text first; output holds an answer back until "
                        "checked, streamed or not")
    g.add_argument("--guard-api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                   help="environment variable with the moderation endpoint's API key (sent only if set)")
    g.add_argument("--guard-refusal", default=DEFAULT_REFUSAL, metavar="TEXT", help="the refusal's message text")


def guard_from_args(args: argparse.Namespace) -> ServeGuard | None:
    """The ServeGuard that the flags ask for (None without --guard); GuardConfigError says what is wrong."""
    if not getattr(args, "guard", None):
        return None
    on = [w.strip() for w in args.guard_on.split(",") if w.strip()]
    return ServeGuard(load_guard(args.guard, args.guard_api_key_env), on, args.guard_refusal)

"""LLM judges for the open-ended tasks (MM-Vet, MMHal, MathVista's extraction fallback).

A judge is any backend asked text-only questions: an OpenAI-compatible endpoint or a local
model. Every call is cached under (judge fingerprint, prompt, temperature, run index), so a
re-run re-grades nothing and `--judge-runs N` repeats grading N times (hosted judges vary even
at temperature 0; the MM-Vet paper reports the mean and spread over 5 runs).
"""

from __future__ import annotations

import threading

from lmmkit.eval.backends.base import Backend, BackendError, GenerationSettings, Request
from lmmkit.eval.cache import ResponseCache, cache_key


class BackendJudge:
    """Wraps a backend as a judge. Thread-safe: local models answer one call at a time."""

    def __init__(self, backend: Backend, cache: ResponseCache, concurrency: int = 1) -> None:
        self.backend = backend
        self.cache = cache
        self.name = backend.name
        self.concurrency = concurrency
        self._lock = threading.Lock() if concurrency <= 1 else None
        self.calls = 0

    def ask(self, prompt: str, temperature: float = 0.0, run: int = 0, max_new_tokens: int = 256) -> str:
        key = cache_key("judge", self.backend.fingerprint(), prompt, temperature, max_new_tokens, run)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
        if self._lock:
            with self._lock:
                reply = self.backend.generate([Request(prompt)], settings)[0]
        else:
            reply = self.backend.generate([Request(prompt)], settings)[0]
        if isinstance(reply, BackendError):
            raise reply
        self.calls += 1
        self.cache.put(key, reply, kind="judge", meta={"judge": self.name, "run": run})
        return reply

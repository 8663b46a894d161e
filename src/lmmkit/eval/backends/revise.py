"""Self-feedback revision (in the spirit of Volcano, Lee et al. 2023) as a wrapper around any backend.

For each request: (1) answer; (2) ask the same model whether that answer is right for the image;
(3) where it says no, ask it for a corrected answer; (4) ask it to choose between the first and the
revised answer. The chosen one is returned. Every step is one batched call to the wrapped backend, so
it works for lmmkit checkpoints, HF folders and endpoints alike, and is cached like any other call
(the wrapper has its own fingerprint). `stats` counts what happened, so a report can say how often
the model revised and switched.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from lmmkit.eval.backends.base import Backend, BackendError, GenerationSettings, Request

FEEDBACK = "{prompt}\nProposed answer: {answer}\nIs the proposed answer correct for this image? Answer yes or no."
REVISE = "{prompt}\nA previous answer was: {answer}\nIt may contain mistakes. Give a corrected answer."
CHOOSE = ("{prompt}\nAnswer A: {first}\nAnswer B: {revised}\nWhich answer is more accurate for this image? "
          "Answer A or B.")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_LETTER = re.compile(r"\b([AB])\b")


def said_no(feedback: str) -> bool:
    """The feedback's first yes/no word is "no" (unreadable feedback keeps the answer)."""
    m = _YES_NO.search(feedback)
    return bool(m) and m.group(1).lower() == "no"


def chose_b(choice: str) -> bool:
    m = _LETTER.search(choice)
    return bool(m) and m.group(1) == "B"


class SelfRevisingBackend:
    def __init__(self, inner: Backend, feedback_tokens: int = 8) -> None:
        self.inner = inner
        self.name = f"{inner.name} (self-revision)"
        self.concurrency = getattr(inner, "concurrency", 1)
        self.feedback_tokens = feedback_tokens
        self.stats: Counter[str] = Counter()

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}:self-revision-v1"

    def _ask(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        return self.inner.generate(list(requests), settings) if requests else []

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        first = self._ask(requests, settings)
        short = GenerationSettings(max_new_tokens=self.feedback_tokens, temperature=0.0)
        ok = [i for i, a in enumerate(first) if isinstance(a, str)]
        feedback = self._ask([Request(FEEDBACK.format(prompt=requests[i].prompt, answer=first[i]), requests[i].images)
                              for i in ok], short)
        doubted = [i for i, f in zip(ok, feedback, strict=True) if isinstance(f, str) and said_no(f)]
        self.stats["answers"] += len(requests)
        self.stats["doubted"] += len(doubted)
        revised = self._ask([Request(REVISE.format(prompt=requests[i].prompt, answer=first[i]), requests[i].images)
                             for i in doubted], settings)
        pairs = [(i, r) for i, r in zip(doubted, revised, strict=True) if isinstance(r, str) and r != first[i]]
        choices = self._ask([Request(CHOOSE.format(prompt=requests[i].prompt, first=first[i], revised=r),
                                     requests[i].images) for i, r in pairs], short)
        out = list(first)
        for (i, r), c in zip(pairs, choices, strict=True):
            if isinstance(c, str) and chose_b(c):
                out[i] = r
                self.stats["switched"] += 1
        return out

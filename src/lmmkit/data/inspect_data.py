"""`lmmkit data inspect`: what a source holds, measured in one streaming pass.

Counts, images per sample, image sizes (read from headers), text token lengths under a tokenizer's
chat template, and bad records by reason. Memory stays flat whatever the source's size: values are
kept as counts per distinct value, and the size scatter is a fixed-size reservoir sample.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.image_ref import image_dims
from lmmkit.data.schema import DataError, Message
from lmmkit.data.sources import open_source

SCATTER_POINTS = 1000


@dataclass
class InspectStats:
    source: str
    n_records: int = 0
    n_images: int = 0
    images_per_sample: Counter = field(default_factory=Counter)
    widths: Counter = field(default_factory=Counter)
    heights: Counter = field(default_factory=Counter)
    long_sides: Counter = field(default_factory=Counter)
    size_sample: list[tuple[int, int]] = field(default_factory=list)
    token_lengths: Counter = field(default_factory=Counter)
    answer_chars: Counter = field(default_factory=Counter)
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)
    tokenizer: str | None = None
    limit: int | None = None
    limit_reached: bool = False
    seconds: float = 0.0

    @property
    def n_bad(self) -> int:
        return self.counter.total

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON: every distribution as {value: count} plus its summary numbers."""
        def dist(c: Counter) -> dict[str, Any]:
            return {"summary": summarize(c), "counts": {str(k): v for k, v in sorted(c.items())}}

        return {
            "source": self.source, "records": self.n_records, "bad_records": self.n_bad, "images": self.n_images,
            "limit": self.limit, "limit_reached": self.limit_reached, "seconds": round(self.seconds, 2),
            "tokenizer": self.tokenizer,
            "bad_reasons": {reason: {"count": n, "examples": self.counter.examples(reason)}
                            for reason, n in self.counter.as_dict().items()},
            "images_per_sample": dist(self.images_per_sample), "image_width": dist(self.widths),
            "image_height": dist(self.heights), "image_long_side": dist(self.long_sides),
            "token_length": dist(self.token_lengths), "answer_chars": dist(self.answer_chars),
        }


def summarize(counts: Counter) -> dict[str, float] | None:
    """min / median / p95 / max / mean of a {value: count} distribution (None when empty)."""
    total = sum(counts.values())
    if not total:
        return None
    items = sorted(counts.items())

    def quantile(q: float) -> float:
        target, seen = q * (total - 1), 0
        for value, n in items:
            seen += n
            if seen > target:
                return value
        return items[-1][0]

    mean = sum(v * n for v, n in items) / total
    return {"min": items[0][0], "median": quantile(0.5), "p95": quantile(0.95), "max": items[-1][0],
            "mean": round(mean, 2)}


def load_tokenizer(ref: str) -> Any:
    """A tokenizer from `shipped:lm`, `models:NAME`, an HF folder or hub id."""
    from transformers import AutoTokenizer

    from lmmkit.models.build import resolve_part

    return AutoTokenizer.from_pretrained(resolve_part(ref))


def token_length(tokenizer, messages: Sequence[Message]) -> int:
    """Text tokens of the conversation as the chat template renders it (each <image> tag counts as
    what the tokenizer makes of it; the model's visual tokens per image come on top)."""
    conv = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(conv, tokenize=False)
    else:  # a plain tokenizer: the turns' text alone is still a fair length
        text = "\n".join(m.content for m in messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def inspect_source(spec: str, limit: int | None = None, tokenizer: Any = "shipped:lm", check: str | None = None,
                   policy: BadRecordPolicy = "skip", seed: int = 0) -> InspectStats:
    """Stream `spec` (at most `limit` good records) and measure it. `tokenizer` is a ref, a loaded
    tokenizer, or None (no token lengths)."""
    name = tokenizer if isinstance(tokenizer, str) or tokenizer is None else type(tokenizer).__name__
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stats = InspectStats(source=spec, tokenizer=name, limit=limit)
    rng = random.Random(seed)
    seen_images = 0
    start = time.perf_counter()
    for record in open_source(spec, policy=policy, counter=stats.counter, check=check):
        if limit is not None and stats.n_records >= limit:
            stats.limit_reached = True
            break
        try:
            dims = [image_dims(img, record.where) for img in record.images]
        except DataError as err:  # only possible with check=none: the reader did not look
            stats.counter.handle(err, policy)
            continue
        stats.n_records += 1
        stats.n_images += len(dims)
        stats.images_per_sample[len(dims)] += 1
        for width, height in dims:
            stats.widths[width] += 1
            stats.heights[height] += 1
            stats.long_sides[max(width, height)] += 1
            # Reservoir sampling: every image equally likely to be plotted, memory fixed.
            seen_images += 1
            if len(stats.size_sample) < SCATTER_POINTS:
                stats.size_sample.append((width, height))
            elif (j := rng.randrange(seen_images)) < SCATTER_POINTS:
                stats.size_sample[j] = (width, height)
        stats.answer_chars[sum(len(m.content) for m in record.messages if m.role == "assistant")] += 1
        if tok is not None:
            stats.token_lengths[token_length(tok, record.messages)] += 1
    stats.seconds = time.perf_counter() - start
    return stats


def format_summary(stats: InspectStats) -> str:
    """The terminal summary: totals, distributions' summaries, bad records by reason with examples."""
    lines = [f"{stats.source}: {stats.n_records} records"
             + (f" (stopped at --limit {stats.limit})" if stats.limit_reached else "")
             + f", {stats.n_bad} bad, {stats.n_images} images ({stats.seconds:.1f} s)"]
    for label, counts in (("images per sample", stats.images_per_sample), ("image width", stats.widths),
                          ("image height", stats.heights), ("answer chars", stats.answer_chars),
                          (f"tokens ({stats.tokenizer})", stats.token_lengths)):
        s = summarize(counts)
        if s is not None:
            lines.append(f"  {label:<22} min {s['min']}  median {s['median']}  p95 {s['p95']}  max {s['max']}  "
                         f"mean {s['mean']}")
    for reason, n in stats.counter.as_dict().items():
        lines.append(f"  bad: {n} x {reason}")
        lines.extend(f"      e.g. {example}" for example in stats.counter.examples(reason)[:2])
    return "\n".join(lines)

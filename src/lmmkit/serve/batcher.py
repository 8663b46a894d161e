"""One worker thread owns the model: requests queue up, those arriving within a short window are
generated together (left-padded, one KV-cached batch), and each request's text streams back through
its own sink as it is produced. Images are encoded by the tower once per distinct content (sha256
of the bytes), kept in a bounded LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from lmmkit.data.collate import pad_batch
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.serve import APIError, ServeLimits
from lmmkit.serve.generate import RowSettings, TextStream, generate_steps
from lmmkit.serve.images import open_image

logger = logging.getLogger("lmmkit.serve")

# Events a job's sink receives: ("delta", text), then ("done", finish_reason, completion_tokens),
# or ("error", message) instead of "done" when generation failed.
Event = tuple


@dataclass
class Job:
    """One chat completion to generate. `image` may be None when the features were cached at parse
    time; `image_bytes` lets the worker decode it anyway if the cache evicted it since."""

    prompt_ids: list[int]
    emit: Callable[[Event], None]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    image_sha: str | None = None
    image: Image.Image | None = None
    image_bytes: bytes | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    image_size: tuple[int, int] | None = None  # (height, width): AnyRes packs the image's features by it


class FeatureLRU:
    """Vision-tower features by image sha256; thread-safe, at most `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > max(0, self.capacity):
                self._items.popitem(last=False)


class Batcher:
    """The request queue and the generation worker."""

    def __init__(self, model: VisionLanguageModel, limits: ServeLimits) -> None:
        self.model = model
        self.limits = limits
        self.features = FeatureLRU(limits.image_cache_size)
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many batches had it
        self.images_encoded = 0  # images run through the vision tower
        self.image_cache_hits = 0
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The worker takes the creator's torch thread count (e.g. `lmmkit serve --threads`), not that of
        # whichever thread happens to start it (the server's event loop).
        self._threads = torch.get_num_threads()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lmmkit-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise APIError(503, "the generation worker is not running", code="unavailable")
        if self._queue.qsize() >= self.limits.max_queue:
            raise APIError(503, f"server busy: {self._queue.qsize()} requests are waiting; retry shortly",
                           code="overloaded")
        self._queue.put(job)

    def stats(self) -> dict:
        return {"batches": sum(self.batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "largest_batch": max(self.batch_sizes, default=0), "queued": self._queue.qsize(),
                "images_encoded": self.images_encoded, "image_cache_hits": self.image_cache_hits,
                "images_cached": len(self.features)}

    # ---- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            # Wait a moment for more: requests sent together are generated together.
            deadline = time.monotonic() + self.limits.batch_window_ms / 1000
            while len(jobs) < self.limits.max_batch_size:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if not jobs:
                continue
            try:
                self._generate(jobs)
            except Exception as err:  # one bad batch must not stop the server
                logger.exception("generation failed for a batch of %d", len(jobs))
                for j in jobs:
                    _send(j, ("error", f"generation failed: {type(err).__name__}: {err}"))

    def _image_features(self, jobs: list[Job]) -> dict[str, torch.Tensor]:
        """Features for every job's image: from the cache, or encoded now in one tower call."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, Image.Image] = {}
        for j in list(jobs):
            if j.image_sha is None or j.image_sha in found or j.image_sha in todo:
                continue
            cached = self.features.get(j.image_sha)
            if cached is not None:
                found[j.image_sha] = cached
                self.image_cache_hits += 1
                continue
            try:
                todo[j.image_sha] = j.image or open_image(j.image_bytes or b"", self.limits.max_image_pixels, "image")
            except APIError as err:
                _send(j, ("error", err.message))
                jobs.remove(j)
        if todo:
            model = self.model
            pixels = model.vision.preprocess(list(todo.values())).to(_device(model))
            feats = model.vision_features(pixels).to(torch.bfloat16)  # as lmmkit's FeatureCache stores them
            # One entry per image: (N, D), or an AnyRes image's (views, N, D) block of the flat batch of views.
            for key, f in zip(todo, model.split_features(feats, model.image_sizes(list(todo.values()))), strict=True):
                found[key] = f.clone()
                self.features.put(key, found[key])
            self.images_encoded += len(todo)
        return found

    def _generate(self, jobs: list[Job]) -> None:
        model = self.model
        device = _device(model)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            feats = self._image_features(jobs)  # drops jobs whose image could not be decoded
            if not jobs:
                return
            self.batch_sizes[len(jobs)] += 1
            batch = pad_batch([(j.prompt_ids, j.prompt_ids) for j in jobs], model.tokenizer.pad_token_id,
                              side="left")
            with_image = [j for j in jobs if j.image_sha is not None]
            image_embeds = None
            if with_image:
                sizes = [j.image_size for j in with_image] if model.variable_tokens else None
                image_embeds = model.encode_images(
                    vision_features=model.join_features([feats[j.image_sha] for j in with_image]).to(device),
                    image_sizes=sizes)
            settings = [RowSettings(j.max_tokens, j.temperature, j.top_p, _generator(j.seed, device)) for j in jobs]
            streams = [TextStream(model.tokenizer, j.stop) for j in jobs]
            finished = [False] * len(jobs)
            counts = [0] * len(jobs)
            steps = generate_steps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   image_embeds, settings, finished)
            for step in steps:
                for i, (token, reason) in enumerate(step):
                    j = jobs[i]
                    if token is not None:
                        counts[i] += 1
                        delta, hit_stop = streams[i].add(token)
                        if delta:
                            _send(j, ("delta", delta))
                        if hit_stop:
                            finished[i], reason = True, "stop"
                    if reason is not None:
                        if rest := streams[i].flush():
                            _send(j, ("delta", rest))
                        _send(j, ("done", reason, counts[i]))
                    elif not finished[i] and j.cancelled.is_set():
                        finished[i] = True  # the client went away: stop spending compute on it


def _send(job: Job, event: Event) -> None:
    # The sink may belong to an event loop that is shutting down; the worker must survive that.
    with contextlib.suppress(RuntimeError):
        job.emit(event)


def _device(model: VisionLanguageModel) -> torch.device:
    return next(model.llm.parameters()).device


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


async def collect(batcher: Batcher, job: Job, deltas: list[str] | None = None) -> tuple[str, str, int]:
    """Run `job` to its end: (text, finish_reason, completion tokens); its deltas go to `deltas`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
    parts = deltas if deltas is not None else []
    batcher.submit(job)
    try:
        while (event := await events.get())[0] == "delta":
            parts.append(event[1])
    finally:
        job.cancelled.set()
    if event[0] == "error":
        raise APIError(500, event[1], code="generation_failed")
    return "".join(parts), event[1], event[2]

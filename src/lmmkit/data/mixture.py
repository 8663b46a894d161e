"""A weighted mixture of sources, streamed by worker processes, resumable exactly after a kill.

Samples are numbered 0, 1, 2, ... Sample i comes from source `choose(seed, i)`: a hash of (seed, i)
against the weights, so the sequence of sources is a pure function of the seed and the index, the
same for any number of workers. Samples are handed out in blocks of `batch_size` (block b holds
samples b*B .. b*B+B-1).

Work is split into N streams (N = the number of DataLoader workers, or given). Stream L makes blocks
L, L+N, L+2N, ...; torch's DataLoader visits its workers in turn, so blocks come out in order.
Every source is split among the streams the same way: a WebDataset source with at least N shards
gives stream L the shards L, L+N, ... of its (seeded) shard order; any other source gives stream L
its good records L, L+N, ... (each stream reads the file's text, but checks and decodes only its
own images). Sources repeat: when a stream has used up its part of a source it starts the next
epoch (wds with a seed: shards reshuffled with seed + epoch).

Each block carries its stream's state: per source, the epoch and the position just after the last
record used (wds: shard and key; other kinds: the count of records passed). `MixtureLoader.state_dict()`
is the state after the last block handed to the caller; a loader built with it continues with
exactly the next block, whatever the workers had prefetched when the job died.

Bad records follow the usual policy ("skip" counts them by reason, "stop" raises), as does a
`transform` that raises a DataError (then the same sample index takes the source's next record).
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import struct
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.image_ref import check_images
from lmmkit.data.mixture_spec import MixtureSpec
from lmmkit.data.schema import ConversationRecord, DataError
from lmmkit.data.sources import CHECKS, open_source, parse_source

STATE_VERSION = 1
MAX_FAILS_IN_A_ROW = 1000  # transform failures for one sample before the source is declared broken


def choose(seed: int, index: int, cumulative: list[float]) -> int:
    """The source of sample `index`: a uniform draw from a hash of (seed, index), against cumulative weights."""
    digest = hashlib.blake2b(struct.pack("<qQ", seed, index), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64 * cumulative[-1]
    return min(bisect_right(cumulative, u), len(cumulative) - 1)


def cumulative_weights(spec: MixtureSpec) -> list[float]:
    return list(itertools.accumulate(float(s.weight) for s in spec.sources))


class _Gate(BadRecordCounter):
    """Passes bad records on to `target` only while open: readers that every stream runs in full report
    their skips once (stream 0, past the resume point), not once per stream and again on resume."""

    def __init__(self, target: BadRecordCounter, open_: bool) -> None:
        super().__init__()
        self.target, self.open = target, open_

    def handle(self, err: DataError, policy: BadRecordPolicy) -> None:
        if policy == "stop" or self.open:
            self.target.handle(err, policy)


class _Cursor:
    """One source's records for one stream, epoch after epoch; `state()` is the position after the last."""

    def __init__(self, name: str, source: str, stream: int, n_streams: int, policy: BadRecordPolicy, check: str | None,
                 counter: BadRecordCounter, state: Mapping[str, Any] | None) -> None:
        self.name, self.source, self.stream, self.n = name, source, stream, n_streams
        self.spec = parse_source(source)
        self.check = check or self.spec.options.get("check", "decode")
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}, not {self.check!r}")
        self.policy, self.counter = policy, counter
        state = dict(state or {})
        self.epoch, self.pos, self.inner = int(state.get("epoch", 0)), int(state.get("pos", 0)), state.get("inner")
        self.used = int(state.get("used", 0))  # records this stream took from the source this epoch
        self._it: Iterator[ConversationRecord] | None = None

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "inner": self.inner, "used": self.used}

    def _shard_order(self) -> list[str]:
        import random

        from lmmkit.data.shards import expand_shards

        order = expand_shards(self.spec.path)
        seed = self.spec.options.get("seed")
        if seed is not None:
            random.Random(int(seed) + self.epoch).shuffle(order)
        return order

    def _records(self) -> Iterator[ConversationRecord]:
        """This stream's part of the current epoch, from the saved position on."""
        if self.spec.kind == "wds":
            from lmmkit.data.formats.webdataset import WebDatasetStream

            order = self._shard_order()
            if len(order) >= self.n:  # whole shards per stream: a resume seeks to the shard
                stream = WebDatasetStream(order[self.stream::self.n], policy=self.policy, counter=self.counter,
                                          check=self.check, state=self.inner)
                for record in stream:
                    self.inner = stream.state_dict()
                    yield record
                return
        gate = _Gate(self.counter, open_=self.stream == 0 and self.pos == 0)
        if self.spec.kind == "wds":
            from lmmkit.data.formats.webdataset import WebDatasetStream

            records: Iterator[ConversationRecord] = WebDatasetStream(order, policy=self.policy, counter=gate, check="none")
        else:
            records = open_source(self.spec, policy=self.policy, counter=gate, check="none")
        k = 0
        for record in records:
            if k < self.pos:  # resuming: pass over records already used (text only: no image is opened)
                k += 1
                gate.open = k == self.pos and self.stream == 0  # skips past the position are new: count them
                continue
            k += 1
            if (k - 1) % self.n != self.stream:
                self.pos = k
                continue
            try:
                check_images(record, self.check)
            except DataError as err:
                self.counter.handle(err, self.policy)
                self.pos = k
                continue
            self.pos = k
            yield record

    def next(self) -> ConversationRecord:
        for _ in range(2):
            if self._it is None:
                self._it = self._records()
            record = next(self._it, None)
            if record is not None:
                self.used += 1
                return record
            empty = self.used == 0
            self._it, self.epoch, self.pos, self.inner, self.used = None, self.epoch + 1, 0, None, 0
            if empty:
                break
        raise DataError(f"mixture source {self.name} ({self.source}): no good record for stream {self.stream} of "
                        f"{self.n} in a whole pass" + (" (fewer records than streams?)" if self.n > 1 else ""))


class MixtureStream:
    """Stream `stream` of `n_streams`: blocks stream, stream + n, ... as (block index, block, state after it)."""

    def __init__(self, spec: MixtureSpec, stream: int, n_streams: int, batch_size: int = 1,
                 transform: Callable[[ConversationRecord], Any] | None = None,
                 collate: Callable[[list], Any] | None = None, policy: BadRecordPolicy = "skip",
                 check: str | None = None, state: Mapping[str, Any] | None = None) -> None:
        self.spec, self.stream, self.n, self.batch_size = spec, stream, n_streams, batch_size
        self.transform, self.collate, self.policy, self.check = transform, collate, policy, check
        self.cumulative = cumulative_weights(spec)
        state = dict(state or {})
        self.block = int(state.get("block", stream))
        self.base_bad: Counter[str] = Counter(state.get("bad", {}))
        self.counter = BadRecordCounter()
        saved = state.get("sources", {})
        self.cursors = [_Cursor(s.name, s.source, stream, n_streams, policy, check, self.counter, saved.get(s.name))
                        for s in spec.sources]

    def state_dict(self) -> dict[str, Any]:
        bad = self.base_bad + Counter(self.counter.as_dict())
        return {"block": self.block, "sources": {c.name: c.state() for c in self.cursors}, "bad": dict(bad)}

    def _sample(self, index: int) -> Any:
        cursor = self.cursors[choose(self.spec.seed, index, self.cumulative)]
        last: DataError | None = None
        for _ in range(MAX_FAILS_IN_A_ROW):
            record = cursor.next()
            if self.transform is None:
                return record
            try:
                return self.transform(record)
            except DataError as err:
                self.counter.handle(err, self.policy)
                last = err
        raise DataError(f"mixture source {cursor.name}: {MAX_FAILS_IN_A_ROW} records in a row failed; last: {last}")

    def blocks(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        while True:
            b = self.block
            samples = [self._sample(i) for i in range(b * self.batch_size, (b + 1) * self.batch_size)]
            self.block = b + self.n
            yield b, (self.collate(samples) if self.collate else samples), self.state_dict()


def _identity(item: Any) -> Any:
    return item


class MixtureDataset(IterableDataset):
    """What the DataLoader's workers run: worker k runs the stream whose block is k-th next."""

    def __init__(self, loader: MixtureLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[int, int, Any, dict[str, Any]]]:
        info = get_worker_info()
        k = info.id if info is not None else 0
        stream = self.loader._stream((self.loader.blocks + k) % self.loader.n_streams)
        for b, block, state in stream.blocks():
            yield stream.stream, b, block, state


class MixtureLoader:
    """Iterate to get blocks (`collate(samples)`, or lists of samples) forever; `state_dict()` after any block.

    `transform(record)` runs in the workers (decode, preprocess, tokenize); `collate(samples)` too.
    `num_workers=0` runs the `n_streams` streams in this process, in the same order: the blocks are
    identical to a run with n_streams workers. A state from another seed, source list, batch size or
    stream count is refused.
    """

    def __init__(self, spec: MixtureSpec, *, batch_size: int = 1, num_workers: int = 0, n_streams: int | None = None,
                 transform: Callable[[ConversationRecord], Any] | None = None, collate: Callable[[list], Any] | None = None,
                 policy: BadRecordPolicy = "skip", check: str | None = None, state: Mapping[str, Any] | None = None,
                 prefetch_factor: int = 2) -> None:
        self.spec = spec.validate()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.n_streams = n_streams or max(1, num_workers)
        if num_workers and num_workers != self.n_streams:
            raise ValueError(f"num_workers={num_workers} but n_streams={self.n_streams}: each worker runs one stream, "
                             "so they must be equal (or num_workers=0 to run the streams in this process)")
        if check is not None and check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}, not {check!r}")
        self.batch_size, self.num_workers, self.prefetch_factor = batch_size, num_workers, prefetch_factor
        self.transform, self.collate, self.policy, self.check = transform, collate, policy, check
        self.blocks = 0
        self.streams: list[dict[str, Any] | None] = [None] * self.n_streams
        if state is not None:
            self._load(state)
        self._check_paths()

    def _check_paths(self) -> None:
        """Every source's data exists (before any worker starts): one error listing all that do not."""
        from pathlib import Path

        from lmmkit.data.mixture_spec import MixtureError
        from lmmkit.data.shards import expand_shards, is_url

        problems = []
        for s in self.spec.sources:
            spec = parse_source(s.source)
            try:
                if spec.kind == "wds":
                    expand_shards(spec.path)
                elif not is_url(spec.path) and not Path(spec.path).expanduser().exists():
                    problems.append(f"source {s.name}: {spec.path} does not exist")
            except DataError as e:
                problems.append(f"source {s.name}: {e}")
        if problems:
            raise MixtureError(problems)

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.spec.seed, "sources": self.spec.identity(), "n_streams": self.n_streams,
                "batch_size": self.batch_size}

    def _load(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != "mixture" or state.get("version") != STATE_VERSION:
            raise DataError(f"not a mixture state (version {STATE_VERSION}): keys {sorted(state)}")
        mine = self._identity()
        for key, value in mine.items():
            saved = state.get(key)
            if key == "sources" and saved is not None:
                saved = [list(s) for s in saved]
            if saved != value:
                raise DataError(f"mixture state was saved with {key}={saved!r}; this loader has {key}={value!r}. "
                                "Resume with the same mixture, seed, batch size and number of streams")
        self.blocks = int(state["blocks"])
        self.streams = list(state["streams"])

    def state_dict(self) -> dict[str, Any]:
        return {"format": "mixture", "version": STATE_VERSION, **self._identity(), "blocks": self.blocks,
                "streams": list(self.streams)}

    def bad_records(self) -> dict[str, int]:
        """Bad records by reason, over all streams, up to the last block handed out."""
        total: Counter[str] = Counter()
        for s in self.streams:
            total.update((s or {}).get("bad", {}))
        return dict(total.most_common())

    def _stream(self, stream: int) -> MixtureStream:
        return MixtureStream(self.spec, stream, self.n_streams, self.batch_size, self.transform, self.collate,
                             self.policy, self.check, self.streams[stream])

    def _items(self) -> Iterator[tuple[int, int, Any, dict[str, Any]]]:
        if self.num_workers == 0:
            gens = [self._stream(i).blocks() for i in range(self.n_streams)]
            while True:
                stream = self.blocks % self.n_streams
                b, block, state = next(gens[stream])
                yield stream, b, block, state
        dl = DataLoader(MixtureDataset(self), batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        prefetch_factor=self.prefetch_factor)
        # Forked workers would otherwise copy most of this process's heap: their garbage collector writes to every
        # object it scans (measured: 150k page faults and +25% CPU per sample with 2 workers).
        gc.freeze()
        try:
            it = iter(dl)
        finally:
            gc.unfreeze()
        try:
            yield from it
        finally:
            it._shutdown_workers()

    def __iter__(self) -> Iterator[Any]:
        for stream, b, block, state in self._items():
            if b != self.blocks:
                raise RuntimeError(f"mixture: expected block {self.blocks}, got block {b} from stream {stream} "
                                   "(the DataLoader did not return worker results in order)")
            self.streams[stream] = state
            self.blocks += 1
            yield block

    def samples(self) -> Iterator[Any]:
        """Sample by sample (batch_size 1 gives one per block); the state counts whole blocks."""
        for block in self:
            yield from (block if self.collate is None else [block])

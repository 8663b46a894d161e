"""Where a stage's batches come from: an in-memory sample list in epochs, or a streamed data mixture.

`run_stage` asks for micro-batch `micro` (0, 1, 2, ... in order) and takes its rank's share. Both kinds
resume exactly: `EpochBatches` because its order is a function of (seed, epoch), `StreamBatches` because
its loader's state (the position of every source in every stream) is saved in each checkpoint's
trainer_state.json under "data" and handed back on `--resume`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from lmmkit.data.check import BadRecordCounter, BadRecordPolicy
from lmmkit.data.dataset import EncodedSample, ImageTokens, encode_records
from lmmkit.data.image_ref import materialize
from lmmkit.data.mixture import MixtureLoader
from lmmkit.data.mixture_spec import MixtureSpec
from lmmkit.data.schema import ConversationRecord, DataError
from lmmkit.train.features import open_image


def batch_order(n_samples: int, batch_size: int, seed: int, epoch: int, lengths: list[int],
                group: int = 32) -> list[list[int]]:
    """Deterministic batches for one epoch: shuffle, sort by length within groups of `group` batches
    (less padding), then shuffle the batches. A function of (seed, epoch) only, so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_samples, generator=g).tolist()
    batches: list[list[int]] = []
    chunk = batch_size * group
    for i in range(0, n_samples, chunk):
        block = sorted(perm[i:i + chunk], key=lambda j: lengths[j])
        batches += [block[k:k + batch_size] for k in range(0, len(block), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[k] for k in order if len(batches[k]) == batch_size or len(batches) == 1]


class EpochBatches:
    """Global batches over an in-memory list, epoch after epoch (`batch_order`)."""

    def __init__(self, samples: list, global_batch: int, seed: int, lengths: list[int], group: int = 32) -> None:
        self.samples, self.global_batch, self.seed, self.lengths, self.group = samples, global_batch, seed, lengths, group
        self.per_epoch = len(samples) // global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{len(samples)} samples are fewer than one batch of {global_batch}")
        self._epoch: tuple[int, list[list[int]]] | None = None

    def steps(self, max_steps: int, epochs: float, grad_accum: int) -> int:
        return max_steps or max(1, math.ceil(epochs * self.per_epoch / grad_accum))

    def get(self, micro: int, rank: int, world: int) -> list:
        epoch, index = divmod(micro, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, batch_order(len(self.samples), self.global_batch, self.seed, epoch, self.lengths,
                                              self.group))
        return [self.samples[i] for i in self._epoch[1][index][rank::world]]

    def state_dict(self) -> dict[str, Any] | None:
        return None  # the step count alone fixes the position

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass

    def close(self) -> None:
        pass


class SampleEncoder:
    """Runs in the mixture's worker processes: a record becomes an EncodedSample with its images decoded and
    preprocessed (`preprocess`, the tower's), so the training process only pads and stacks. A record that is
    too long, or whose images fail, raises a DataError: the mixture counts it (or stops) and takes the next."""

    def __init__(self, tokenizer, image_token_id: int, tokens_per_image: ImageTokens, max_length: int,
                 preprocess: Callable[[list], torch.Tensor], variable_tokens: bool) -> None:
        self.tokenizer, self.image_token_id, self.tokens_per_image = tokenizer, image_token_id, tokens_per_image
        self.max_length, self.preprocess, self.variable_tokens = max_length, preprocess, variable_tokens

    def __call__(self, record: ConversationRecord) -> EncodedSample:
        record = materialize(record)  # ImageRefs (shards, base64, parquet) -> decoded images
        opened = [open_image(im, record.where) for im in record.images]
        record = replace(record, images=opened)
        # "stop": the record's DataError goes up to the mixture, which applies the run's policy to it
        sample = encode_records([record], self.tokenizer, self.image_token_id, self.tokens_per_image,
                                self.max_length, BadRecordCounter(), "stop")[0]
        if opened:
            sample.pixels = self.preprocess(opened)
            if self.variable_tokens:
                sample.image_sizes = [(im.height, im.width) for im in opened]
        sample.images = []  # the pixels travel instead of the decoded images
        return sample


class StreamBatches:
    """Global batches from a `MixtureLoader` (worker processes decode and tokenize); resumable exactly.

    Every rank streams the same global batches and keeps its share, so a run on N processes trains on
    the samples a single process would (each rank decodes the whole global batch: simple, and correct;
    the decode cost is per rank, not divided)."""

    def __init__(self, spec: MixtureSpec, encoder: SampleEncoder, batch_size: int, num_workers: int,
                 policy: BadRecordPolicy = "skip") -> None:
        self.spec, self.encoder, self.batch_size = spec, encoder, batch_size  # per process
        self.world = 1  # the number of processes: known once the loop asks for a batch
        self.num_workers, self.policy = num_workers, policy
        self.state: dict[str, Any] | None = None
        self.loader: MixtureLoader | None = None
        self._it: Iterator[list] | None = None
        self.consumed = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def steps(self, max_steps: int, epochs: float, grad_accum: int) -> int:
        if not max_steps:
            raise ValueError("a data mixture streams without end: set train.max_steps (epochs have no meaning)")
        return max_steps

    def _open(self) -> None:
        self.loader = MixtureLoader(self.spec, batch_size=self.global_batch, num_workers=self.num_workers,
                                    n_streams=max(1, self.num_workers), transform=self.encoder, policy=self.policy,
                                    check="none", state=self.state)
        self._it = iter(self.loader)

    def get(self, micro: int, rank: int, world: int) -> list:
        if self._it is None:
            self.world = world
            self._open()
            self.consumed = micro
        if micro != self.consumed:
            raise RuntimeError(f"stream batches are read in order: asked for micro-batch {micro}, next is "
                               f"{self.consumed}")
        block = next(self._it)  # type: ignore[arg-type]
        self.consumed += 1
        return block[rank::world]

    def state_dict(self) -> dict[str, Any] | None:
        return self.loader.state_dict() if self.loader is not None else self.state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise DataError("this checkpoint has no data-stream position (trainer_state.json 'data'): it was not "
                            "written by a mixture run, so the mixture cannot resume from it")
        self.state = state

    def bad_records(self) -> dict[str, int]:
        return self.loader.bad_records() if self.loader is not None else {}

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]  (a generator: shuts the workers down)
            self._it = None


BatchSource = EpochBatches | StreamBatches

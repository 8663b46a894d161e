"""Sequence packing: several encoded samples share one row, and no sample sees another.

Why: padded batches spend compute on pad positions; packing fills each row (up to `data.max_length`)
with whole samples instead. Three things keep a packed row equal to its samples trained one by one:

- a block-diagonal causal 4D mask: a token attends only to earlier tokens of its own sample. transformers
  5.24 hands a 4D mask to the attention function unchanged (`create_causal_mask` returns it as given);
  sdpa takes it as bool, eager only as an additive float mask (a bool one would be *added* as 0/1), so
  the form follows the LLM's attention implementation;
- position ids restarting at 0 for every sample (RoPE / learned positions see what they saw unpacked);
- the first token of every sample is never a target: unpacked, nothing precedes it, but packed, the
  previous sample's last token would be trained to predict it.

What is packed is one step's samples: the epoch order is still batch_order's (a function of seed and
epoch, so resume is exact), a step still trains on `batch_size` samples (so the loss, the learning-rate
schedule and `max_steps` mean what they mean unpacked), and first-fit decreasing lays those samples into
rows of at most max_length tokens, at the row budget that computes the fewest positions (`pack_rows`); so a
step never computes more positions packed than padded. A sample is never split across rows, so neither is any image; the images of a
row are given to the model in the order of the samples in it, the order its placeholders come in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lmmkit.data.collate import PAD_MULTIPLE
from lmmkit.data.dataset import EncodedSample
from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.models.cross_attention_vlm import CrossAttentionVLM
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.spec_checks import packing_problem
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import image_inputs, labelled_targets, target_loss
from lmmkit.train.varlen import VARLEN_ATTENTION, varlen_layout

MASK_IMPLEMENTATIONS = ("sdpa", "eager")  # attention implementations that apply a custom 4D mask


class PackingError(ValueError):
    """The model cannot train packed rows; the message says why and what can."""


def check_packable(model: nn.Module, max_length: int) -> None:
    """Raise PackingError unless `model` can train rows packed up to `max_length` tokens."""
    if not isinstance(model, VisionLanguageModel) or isinstance(model, CrossAttentionVLM):
        raise PackingError(f"train.packing: a {type(model).__name__} cannot train packed rows; packing splices image "
                           "features into the text of each sample (LLaVA-style bridges), but cross-attention models "
                           "let every token of a row see every image of it. Set train.packing=false")
    config = model.llm.config
    why = packing_problem(config.model_type)
    if why:
        raise PackingError(why)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in (*MASK_IMPLEMENTATIONS, VARLEN_ATTENTION):
        raise PackingError(f"train.packing: the LLM runs attention with {impl!r}, which lmmkit does not hand a 4D "
                           f"block-diagonal mask; load it with attn_implementation one of "
                           f"{', '.join(MASK_IMPLEMENTATIONS)}, or {VARLEN_ATTENTION} on a GPU (train/varlen.py)")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and isinstance(window, int) and window < max_length:
        # The custom mask replaces the model's own, sliding window included: only safe when the window is moot.
        raise PackingError(f"train.packing: the LLM attends within a sliding window of {window} tokens, shorter than "
                           f"data.max_length={max_length}; the packed mask would let tokens see further than that. "
                           f"Set data.max_length <= {window} or train.packing=false")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= capacity: longest first, each into the first
    row with room, else a new row. Ties keep their given order, so the result depends on that order only."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties in the given order
    room = np.zeros(len(lengths), dtype=np.int64)  # free tokens per row; at most one row per item
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise PackingError(f"a sample of {n} tokens does not fit a packed row of {capacity} (data.max_length); "
                               "encode with the same max_length as packs")
        fits = np.flatnonzero(room[:len(rows)] >= n)
        if fits.size:
            rows[int(fits[0])].append(i)
            room[fits[0]] -= n
        else:
            rows.append([i])
            room[len(rows) - 1] = capacity - n
    return rows


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """first_fit_decreasing at the row budget (<= max_length) that computes the fewest positions (rows x width
    rounded up to PAD_MULTIPLE), the narrower on ties: samples of similar lengths would leave the same gap in
    every full-length row, and every position of a row's width is computed, attention quadratically so."""
    def width(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE

    budgets = sorted({min(b, max_length) for b in range(width(max(lengths)), width(max_length) + 1, PAD_MULTIPLE)})
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    for budget in budgets or [max_length]:  # no budget: the longest does not fit, and FFD says so
        rows = first_fit_decreasing(lengths, budget)
        w = width(max(sum(lengths[i] for i in row) for row in rows))
        if best is None or (len(rows) * w, w) < best[0]:
            best = ((len(rows) * w, w), rows)
    return best[1]


def packed_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, L, L) mask from per-position segment ids: query q sees key k iff k <= q and both are in one
    segment. bool (True = attend) for sdpa; additive float (0 / dtype min) for eager."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def make_packed_batch(model: VisionLanguageModel, samples: list[EncodedSample], cache: FeatureCache | None,
                      pad_id: int, max_length: int) -> dict:
    """Samples packed into rows of at most max_length tokens: input_ids, labels, position_ids, the 4D
    attention_mask, the image inputs (row-major sample order), `num_tokens` (non-pad) and per-row sample ids.
    An LLM on the varlen kernel (train/varlen.py) gets all samples in one row and no mask instead."""
    impl = getattr(model.llm.config, "_attn_implementation", None) or "eager"
    if impl == VARLEN_ATTENTION:
        batch = varlen_layout(samples)
        batch.update(image_inputs(model, samples, cache))
        batch["sample_ids"] = ["+".join(s.id for s in samples)]
        return batch
    rows = pack_rows([len(s.input_ids) for s in samples], max_length)
    fill = [sum(len(samples[i].input_ids) for i in row) for row in rows]
    width = -(-max(fill) // PAD_MULTIPLE) * PAD_MULTIPLE  # as pad_batch: few distinct shapes under CPU autocast
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    # Pads are segments of one position each (negative ids): a pad attends to itself only, so no softmax row
    # is empty (that would be NaN, and NaN * 0 in the backward pass would poison the gradients).
    segments = -1 - torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            s = samples[i]
            n = len(s.input_ids)
            input_ids[r, start:start + n] = torch.tensor(s.input_ids)
            labels[r, start:start + n] = torch.tensor(s.labels)
            labels[r, start] = IGNORE_INDEX  # else the previous sample's last token learns to predict it
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = k
            start += n
    ordered = [samples[i] for row in rows for i in row]
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions,
             "attention_mask": packed_mask(segments, impl, model.llm.dtype)}
    batch.update(image_inputs(model, ordered, cache))
    batch["sample_ids"] = ["+".join(samples[i].id for i in row) for row in rows]
    batch["num_tokens"] = sum(fill)
    return batch


class PackedLMObjective:
    """The LM loss of `LMObjective` on packed rows; `run_stage(objective=PackedLMObjective(model, max_length))`.

    Batches are plain shuffles (length_group 1): packing, not sorting by length, removes the padding, and
    batches stay free of the length correlation sorting brings."""

    length_group = 1

    def __init__(self, model: VisionLanguageModel, max_length: int) -> None:
        check_packable(model, max_length)
        self.max_length = max_length

    def length(self, sample: EncodedSample) -> int:
        return len(sample.input_ids)

    def batch(self, model: VisionLanguageModel, samples: list[EncodedSample], cache: FeatureCache | None,
              pad_id: int) -> dict:
        return make_packed_batch(model, samples, cache, pad_id, self.max_length)

    def loss_units(self, batch: dict) -> int:
        return labelled_targets(batch)

    def loss(self, wrapped: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return target_loss(wrapped, batch), {}


__all__ = ["MASK_IMPLEMENTATIONS", "PackedLMObjective", "PackingError", "check_packable", "first_fit_decreasing",
           "make_packed_batch", "pack_rows", "packed_mask"]

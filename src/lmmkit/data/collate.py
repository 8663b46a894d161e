"""From encoded conversations to padded batches: image-token expansion, length fitting, padding."""

from __future__ import annotations

import logging
from typing import Literal

import torch

from lmmkit.data.templates import IGNORE_INDEX

logger = logging.getLogger("lmmkit.data")


def expand_image_tokens(
    input_ids: list[int],
    labels: list[int],
    image_token_id: int,
    tokens_per_image: int | list[int],
) -> tuple[list[int], list[int]]:
    """Replace each image token with N copies (labels -100), as HF's Llava processor does.

    The model later scatters the N image features into those positions, so the text must reserve
    exactly one slot per feature. `tokens_per_image` is one N for all images or one per image.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ in length")
    n_images = sum(1 for t in input_ids if t == image_token_id)
    counts = [tokens_per_image] * n_images if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if len(counts) != n_images:
        raise ValueError(f"{len(counts)} tokens_per_image entries for {n_images} image token(s)")
    if any(n < 1 for n in counts):
        raise ValueError(f"tokens_per_image must be >= 1, got {counts}")
    ids_out: list[int] = []
    labels_out: list[int] = []
    k = 0
    for tok, lab in zip(input_ids, labels, strict=True):
        if tok == image_token_id:
            ids_out.extend([image_token_id] * counts[k])
            # Never learn to predict image slots: they are filled by features, not sampled.
            labels_out.extend([IGNORE_INDEX] * counts[k])
            k += 1
        else:
            ids_out.append(tok)
            labels_out.append(lab)
    return ids_out, labels_out


def fit_to_length(
    ids: list[int],
    labels: list[int],
    max_len: int,
    image_token_id: int,
    where: str,
) -> tuple[list[int], list[int]] | None:
    """Fit an (expanded) sequence into `max_len` tokens, or return None to drop it.

    Truncation is allowed only if it cuts no image apart (no image token at or beyond the cut, which
    would leave features without slots) and at least one label survives (else the example teaches
    nothing). Dropped examples are logged naming `where`; the caller counts them.
    """
    if len(ids) <= max_len:
        return ids, labels
    if any(t == image_token_id for t in ids[max_len:]):
        logger.warning(
            "%s: dropped: %d tokens > max_len %d and the cut would split or remove an image",
            where,
            len(ids),
            max_len,
        )
        return None
    if all(lab == IGNORE_INDEX for lab in labels[:max_len]):
        logger.warning(
            "%s: dropped: %d tokens > max_len %d and no answer token would survive truncation",
            where,
            len(ids),
            max_len,
        )
        return None
    logger.debug("%s: truncated from %d to %d tokens", where, len(ids), max_len)
    return ids[:max_len], labels[:max_len]


PAD_MULTIPLE = 32


def pad_batch(
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    side: Literal["right", "left"] = "right",
    multiple_of: int = PAD_MULTIPLE,
) -> dict[str, torch.Tensor]:
    """Pad (ids, labels) pairs into input_ids, attention_mask and labels tensors (labels pad -100).

    Right padding is for training; left padding for batched generation, so every prompt ends at
    the last position and new tokens append in step. The width is rounded up to `multiple_of`:
    measured here, every distinct sequence length under CPU bf16 autocast leaves kernels cached
    for good (a 4-layer model grew from 1.1 to 3.2 GB in 120 steps of varied lengths; rounding
    to 32 kept it flat).
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    width = max(len(ids) for ids, _ in seqs)
    width = -(-width // multiple_of) * multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(seqs):
        if len(ids) != len(labs):
            raise ValueError(f"sequence {row}: {len(ids)} ids but {len(labs)} labels")
        n = len(ids)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

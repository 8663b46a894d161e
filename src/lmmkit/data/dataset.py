"""Records -> encoded training samples (token ids, assistant-only labels, image references)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmmkit.data.check import REASON_TOO_LONG, BadRecordCounter, BadRecordPolicy, data_error
from lmmkit.data.collate import expand_image_tokens, fit_to_length
from lmmkit.data.schema import ConversationRecord, DataError
from lmmkit.data.templates import encode_conversation


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list = field(default_factory=list)  # image paths (or PIL images), one per <image>
    where: str = ""
    # Set by a streaming data worker (train/batches.SampleEncoder): the images already preprocessed by the
    # tower (`VisionTower.preprocess`), and their (height, width) when the token count depends on the size.
    pixels: Any = None
    image_sizes: list[tuple[int, int]] | None = None


ImageTokens = int | Callable[[Sequence, str], list[int]]
"""Visual tokens per image: one count for every image, or a function (images, where) -> a count per
image, e.g. `VisionLanguageModel.image_token_counts` for a model whose count depends on the size."""


def image_token_counts(tokens_per_image: ImageTokens, images: Sequence, where: str) -> int | list[int]:
    """What expand_image_tokens takes for one record's images."""
    return tokens_per_image if isinstance(tokens_per_image, int) else tokens_per_image(images, where)


def encode_records(records: Iterable[ConversationRecord], tokenizer, image_token_id: int,
                   tokens_per_image: ImageTokens, max_length: int, counter: BadRecordCounter,
                   policy: BadRecordPolicy = "skip") -> list[EncodedSample]:
    """Encode every record; bad or too-long ones are handled by `policy` and counted in `counter`.

    An image that cannot be sized (missing, corrupt) when its count depends on the size is a bad record too."""
    samples = []
    for record in records:
        try:
            ids, labels = encode_conversation(tokenizer, record.messages)
            counts = image_token_counts(tokens_per_image, record.images, record.where)
            ids, labels = expand_image_tokens(ids, labels, image_token_id, counts)
            fitted = fit_to_length(ids, labels, max_length, image_token_id, record.where)
            if fitted is None:
                raise data_error(f"{record.where}: {len(ids)} tokens exceed max_length={max_length} and cannot be "
                                 "truncated without cutting an image's tokens or every answer; dropped",
                                 REASON_TOO_LONG)
        except DataError as err:
            counter.handle(err, policy)
            continue
        samples.append(EncodedSample(record.id, fitted[0], fitted[1], list(record.images), record.where))
    return samples

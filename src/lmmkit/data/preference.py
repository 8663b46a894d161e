"""Preference data: one record type (a prompt, its images, a chosen and a rejected answer) and its
encoding into the two token sequences DPO compares.

Only the final answer is scored: labels cover the chosen (or rejected) response and nothing in the
prompt, even when the prompt holds earlier assistant turns. Both sequences share the prompt's
tokens and images, so the trainer encodes each image once for the pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lmmkit import IMAGE_TOKEN
from lmmkit.data.check import (
    REASON_MALFORMED,
    REASON_TAG_MISMATCH,
    REASON_TOO_LONG,
    BadRecordCounter,
    BadRecordPolicy,
    data_error,
)
from lmmkit.data.collate import expand_image_tokens, fit_to_length
from lmmkit.data.dataset import EncodedSample, ImageTokens, image_token_counts
from lmmkit.data.schema import ROLES, DataError, Message
from lmmkit.data.templates import IGNORE_INDEX, encode_conversation, encode_prompt

REASON_IDENTICAL = "identical chosen and rejected"
REASON_EMPTY_ANSWER = "empty chosen or rejected"


@dataclass
class PreferenceRecord:
    """A prompt (ending with a user turn) with images, and two answers: `chosen` is preferred.

    `source` says where the record came from ("file.json#12") so errors can name it; ratings are
    kept when the format has them (VLFeedback: mean of the annotated aspects).
    """

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    images: list = field(default_factory=list)
    source: str = ""
    chosen_rating: float | None = None
    rejected_rating: float | None = None

    @property
    def where(self) -> str:
        return f"{self.source} (id={self.id})" if self.source else f"record id={self.id}"

    def validate(self) -> None:
        """Structural checks that need no files."""
        if not self.prompt:
            raise data_error(f"{self.where}: the prompt is empty", REASON_MALFORMED)
        for i, m in enumerate(self.prompt):
            if m.role not in ROLES:
                raise data_error(f"{self.where}: prompt message {i} has role {m.role!r}; allowed: {', '.join(ROLES)}",
                                 REASON_MALFORMED)
        if self.prompt[-1].role != "user":
            raise data_error(f"{self.where}: the prompt must end with a user turn (it ends with "
                             f"{self.prompt[-1].role!r}), so there is nothing for the answers to answer",
                             REASON_MALFORMED)
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise data_error(f"{self.where}: '{name}' is missing or empty", REASON_EMPTY_ANSWER)
        if self.chosen.strip() == self.rejected.strip():
            raise data_error(f"{self.where}: chosen and rejected are the same text, so the pair teaches nothing",
                             REASON_IDENTICAL)
        tags = sum(m.content.count(IMAGE_TOKEN) for m in self.prompt)
        if tags != len(self.images):
            raise data_error(f"{self.where}: {tags} {IMAGE_TOKEN} tag(s) in the prompt but {len(self.images)} image(s)",
                             REASON_TAG_MISMATCH)
        for name in ("chosen", "rejected"):
            if IMAGE_TOKEN in getattr(self, name):
                raise data_error(f"{self.where}: the {name} answer contains an {IMAGE_TOKEN} tag", REASON_MALFORMED)

    def conversation(self, which: str) -> list[Message]:
        """The prompt followed by the chosen or rejected answer."""
        answer = {"chosen": self.chosen, "rejected": self.rejected}[which]
        return [*self.prompt, Message("assistant", answer)]


@dataclass
class EncodedPair:
    """Chosen and rejected as training samples with answer-only labels; images shared."""

    id: str
    chosen: EncodedSample
    rejected: EncodedSample
    where: str = ""

    @property
    def images(self) -> list:
        return self.chosen.images


def _encode_answer_only(tokenizer, record: PreferenceRecord, which: str) -> tuple[list[int], list[int]]:
    ids, labels = encode_conversation(tokenizer, record.conversation(which))
    prefix = encode_prompt(tokenizer, record.prompt)
    if ids[:len(prefix)] != prefix:
        raise data_error(f"{record.where}: the prompt tokenizes differently alone and before the {which} answer; "
                         "the answer's tokens cannot be separated", REASON_MALFORMED)
    labels = [IGNORE_INDEX] * len(prefix) + labels[len(prefix):]
    return ids, labels


def encode_preferences(records: Iterable[PreferenceRecord], tokenizer, image_token_id: int,
                       tokens_per_image: ImageTokens, max_length: int, counter: BadRecordCounter,
                       policy: BadRecordPolicy = "skip") -> list[EncodedPair]:
    """Encode every record into a chosen and a rejected sample; bad or too-long ones go through `policy`.
    `tokens_per_image` is one count, or a function (images, where) -> a count per image (AnyRes)."""
    pairs = []
    for record in records:
        try:
            record.validate()
            encoded = []
            counts = image_token_counts(tokens_per_image, record.images, record.where)
            for which in ("chosen", "rejected"):
                ids, labels = _encode_answer_only(tokenizer, record, which)
                ids, labels = expand_image_tokens(ids, labels, image_token_id, counts)
                fitted = fit_to_length(ids, labels, max_length, image_token_id, record.where)
                if fitted is None:
                    raise data_error(f"{record.where}: the {which} sequence ({len(ids)} tokens) exceeds "
                                     f"max_length={max_length} and cannot be cut without losing an image's tokens "
                                     "or the whole answer; dropped", REASON_TOO_LONG)
                encoded.append(EncodedSample(f"{record.id}/{which}", fitted[0], fitted[1], list(record.images),
                                             record.where))
        except DataError as err:
            counter.handle(err, policy)
            continue
        pairs.append(EncodedPair(record.id, encoded[0], encoded[1], record.where))
    return pairs

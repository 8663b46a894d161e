"""The one record type that every data format converts into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmmkit import IMAGE_TOKEN

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad record or file. The message names the file and the record."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str  # may contain IMAGE_TOKEN placeholders, one per image, in order


@dataclass
class ConversationRecord:
    """A multimodal conversation: the images, then messages that refer to them with <image> tags.

    `images` are paths (already resolved against the image folder) or in-memory PIL images;
    `source` says where the record came from ("file.json#12") so errors can name it.
    """

    id: str
    messages: list[Message]
    images: list = field(default_factory=list)
    source: str = ""

    @property
    def where(self) -> str:
        return f"{self.source} (id={self.id})" if self.source else f"record id={self.id}"

    def image_tag_count(self) -> int:
        return sum(m.content.count(IMAGE_TOKEN) for m in self.messages)

    def validate(self) -> None:
        """Structural checks that need no files: roles, an assistant turn, tags vs images."""
        if not self.messages:
            raise DataError(f"{self.where}: conversation is empty")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise DataError(f"{self.where}: message {i} has role {m.role!r}; allowed: {', '.join(ROLES)}")
        if not any(m.role == "assistant" for m in self.messages):
            raise DataError(f"{self.where}: conversation has no assistant turn (nothing to learn from)")
        tags = self.image_tag_count()
        if tags != len(self.images):
            raise DataError(
                f"{self.where}: {tags} {IMAGE_TOKEN} tag(s) in the text but {len(self.images)} image(s)"
            )

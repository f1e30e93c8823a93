"""The training/evaluation sample: a query, one positive and zero or more hard negatives.

Each side is an `Item` with text, an encoded image (the original JPEG/PNG bytes) and an optional
instruction; at least one of text and image is present. For evaluation the same layout holds a
query's own candidate list: `pos` is the first candidate (the correct one), `negs` the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One side of a pair: text, image bytes (jpg/png as stored), and an optional instruction."""

    text: str | None = None
    image: bytes | None = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("an Item needs text or an image (both are None)")

    @property
    def modality(self) -> str:
        """'text', 'image' or 'image+text'."""
        if self.image is None:
            return "text"
        return "image" if self.text is None else "image+text"

    def digest(self) -> bytes:
        """16 bytes that identify what the model is shown — instruction, text and image bytes — so
        equal digests mean equal embeddings. The one content identity of mmemb: the loss's
        duplicate-positive keys, mining's de-duplication and the eval's item cache all use it.
        Each field is flagged present or absent and length-prefixed, so None differs from "" and
        bytes cannot move between fields to make two items collide."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.instruction, self.text, self.image):
            if part is None:
                h.update(b"\0")
                continue
            data = part.encode() if isinstance(part, str) else part
            h.update(b"\1" + len(data).to_bytes(8, "little"))
            h.update(data)
        return h.digest()

    def content_hash(self) -> str:
        """:meth:`digest` as hex (mining's de-duplication of candidates)."""
        return self.digest().hex()


@dataclass
class Sample:
    """A query with its positive and hard negatives, from the dataset named `dataset`."""

    id: str
    dataset: str
    query: Item
    pos: Item
    negs: list[Item] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates(self) -> list[Item]:
        """The positive followed by the negatives (an eval sample's candidate list)."""
        return [self.pos, *self.negs]

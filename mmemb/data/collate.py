"""Collation: samples -> the query and candidate batches (through the backbone's processor) and
the `targets` layout the contrastive loss expects.

For B samples with K hard negatives each, the candidates are laid out as::

    [pos_0, pos_1, ..., pos_{B-1},  neg_0^0..neg_0^{K-1},  neg_1^0..neg_1^{K-1},  ...]

so ``targets = arange(B)`` (query i's positive is column i), every query also sees every other
query's positive (in-batch negatives) and everyone's hard negatives. Positives come first so the
layout stays simple when candidates of several ranks are gathered (rank r's block starts at
r * B * (1 + K)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mmemb.data.schema import Item, Sample
from mmemb.errors import DataError
from mmemb.model import InputProcessor, ModelInputs


@dataclass
class Batch:
    """One training step's inputs on one device."""

    query: ModelInputs
    """processor(queries, side='query'): B items."""
    candidates: ModelInputs
    """processor(candidates, side='target'): B positives then B*K negatives (sample-major)."""
    targets: torch.Tensor
    """(B,) int64: the candidate column of each query's positive (= arange(B))."""
    num_negatives: int
    datasets: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    keys: torch.Tensor | None = None
    """(B·(1+K),) int64 content key of each candidate (:func:`content_key`): the loss masks a
    column whose key equals a row's positive's, so a copy of the positive is never a negative."""

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return Batch(
            query={k: v.to(device, non_blocking=non_blocking) for k, v in self.query.items()},
            candidates={
                k: v.to(device, non_blocking=non_blocking) for k, v in self.candidates.items()
            },
            targets=self.targets.to(device, non_blocking=non_blocking),
            num_negatives=self.num_negatives,
            datasets=list(self.datasets),
            ids=list(self.ids),
            keys=None if self.keys is None else self.keys.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked copies for faster GPU transfer."""
        return Batch(
            query={k: v.pin_memory() for k, v in self.query.items()},
            candidates={k: v.pin_memory() for k, v in self.candidates.items()},
            targets=self.targets.pin_memory(),
            num_negatives=self.num_negatives,
            datasets=self.datasets,
            ids=self.ids,
            keys=None if self.keys is None else self.keys.pin_memory(),
        )


def content_key(item: Item) -> int:
    """A signed 64-bit content key: the first 8 bytes of :meth:`Item.digest` (instruction, text
    and image bytes). Equal keys mean the same input, hence the same embedding."""
    return int.from_bytes(item.digest()[:8], "little", signed=True)


class Collator:
    """Turns a list of samples into a `Batch` with `processor` (picklable: runs in data workers).

    Each sample must have at least `num_negatives` hard negatives; the first `num_negatives` are
    used. ``num_negatives=0`` trains with in-batch negatives only.
    """

    def __init__(self, processor: InputProcessor, num_negatives: int) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0 (got {num_negatives})")
        self.processor = processor
        self.num_negatives = num_negatives

    def _negatives(self, sample: Sample) -> list[Item]:
        k = self.num_negatives
        if len(sample.negs) < k:
            raise DataError(
                f"sample {sample.id!r} of dataset '{sample.dataset}' has {len(sample.negs)} hard "
                f"negative(s) but {k} are asked for (train.negatives). Lower the recipe's "
                f"train.negatives to at most {len(sample.negs)}, or prepare/mine data with more "
                "negatives (see each dataset's negatives.min in its manifest.json)."
            )
        return sample.negs[:k]

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        negatives = [self._negatives(s) for s in samples]
        candidates: list[Item] = [s.pos for s in samples]
        for negs in negatives:
            candidates.extend(negs)
        return Batch(
            query=self.processor([s.query for s in samples], side="query"),
            candidates=self.processor(candidates, side="target"),
            targets=torch.arange(len(samples), dtype=torch.long),
            num_negatives=self.num_negatives,
            datasets=[s.dataset for s in samples],
            ids=[s.id for s in samples],
            keys=torch.tensor([content_key(item) for item in candidates], dtype=torch.long),
        )

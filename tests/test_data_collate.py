"""Collator: candidate layout, targets, negatives count, device moves."""

from __future__ import annotations

import pickle

import pytest
import torch

from mmemb.data.collate import Batch, Collator
from mmemb.data.schema import Item, Sample
from mmemb.data.testing import ByteProcessor, jpeg_bytes, png_bytes
from mmemb.errors import DataError


def _decode_text(ids: torch.Tensor) -> str:
    """Inverse of ByteProcessor's text encoding (drops the side token and padding)."""
    return bytes(int(t) - 3 for t in ids[1:] if int(t) > 2).decode()


def _samples(k: int = 2) -> list[Sample]:
    return [
        Sample(
            id=f"s{i}",
            dataset="d" if i < 2 else "e",
            query=Item(text=f"q{i}", image=jpeg_bytes(i)),
            pos=Item(text=f"p{i}"),
            negs=[Item(text=f"n{i}.{j}", image=png_bytes(j)) for j in range(k)],
        )
        for i in range(3)
    ]


def test_layout_positives_then_negatives_per_sample() -> None:
    batch = Collator(ByteProcessor(), num_negatives=2)(_samples(k=3))
    assert batch.query["input_ids"].shape[0] == 3
    texts = [_decode_text(row) for row in batch.candidates["input_ids"]]
    assert texts == ["p0", "p1", "p2", "n0.0", "n0.1", "n1.0", "n1.1", "n2.0", "n2.1"]
    assert [_decode_text(r) for r in batch.query["input_ids"]] == ["q0", "q1", "q2"]
    assert torch.equal(batch.targets, torch.arange(3))
    assert batch.targets.dtype == torch.long
    assert batch.num_negatives == 2
    assert batch.ids == ["s0", "s1", "s2"]
    assert batch.datasets == ["d", "d", "e"]
    # query side and target side are processed as such
    assert batch.query["input_ids"][:, 0].tolist() == [1, 1, 1]
    assert batch.candidates["input_ids"][:, 0].unique().tolist() == [2]
    # images went through the processor: queries have them, positives do not, negatives do
    assert batch.query["has_image"].tolist() == [1, 1, 1]
    assert batch.candidates["has_image"].tolist() == [0, 0, 0] + [1] * 6


def test_zero_negatives_gives_positives_only() -> None:
    batch = Collator(ByteProcessor(), num_negatives=0)(_samples(k=2))
    assert batch.candidates["input_ids"].shape[0] == 3


def test_too_few_negatives_names_sample_and_fix() -> None:
    samples = _samples(k=2)
    samples[1].negs = samples[1].negs[:1]
    with pytest.raises(DataError) as exc:
        Collator(ByteProcessor(), num_negatives=2)(samples)
    msg = str(exc.value)
    assert "'s1'" in msg and "dataset 'd'" in msg and "train.negatives" in msg
    assert "at most 1" in msg


def test_batch_to_and_pickle() -> None:
    collator = Collator(ByteProcessor(), num_negatives=1)
    batch = pickle.loads(pickle.dumps(collator(_samples())))  # crosses worker processes
    moved = batch.to("cpu")
    assert isinstance(moved, Batch)
    assert moved is not batch and len(moved) == 3
    for key, value in batch.candidates.items():
        assert torch.equal(moved.candidates[key], value)
    pickle.dumps(collator)  # the collator itself must be picklable for data workers


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError):
        Collator(ByteProcessor(), num_negatives=0)([])

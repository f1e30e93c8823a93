"""From eval samples to embeddings: de-duplicate items, record each query's candidate list, encode
this rank's share of the unique items, and gather the shares on rank 0.

An MMEB set has ~1000 queries with ~1000 candidates each, but the candidates are mostly shared
(classification sets rank every image against one label list), so items are encoded once per
distinct (text, image bytes, instruction) on each side, as VLM2Vec does by keying embeddings on
(text, image path). The result, `EncodedDataset`, is what both eval tasks score and what the cache
stores: the unique query and target embeddings plus the index structure mapping samples onto them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mmemb.batching import length_key
from mmemb.data.schema import Item, Sample
from mmemb.errors import DataError
from mmemb.model import Encoder, Side

EncodeFn = Callable[[Sequence[Item], Side], np.ndarray]
"""Embeds a batch of items on one side; returns float32 (len(items), D)."""

SIDES: tuple[Side, Side] = ("query", "target")


def item_key(item: Item) -> bytes:
    """A digest of everything that changes an item's embedding (:meth:`Item.digest`)."""
    return item.digest()


@dataclass
class EncodedDataset:
    """One dataset's embeddings and structure.

    Sample i's query is ``queries[query_index[i]]`` and its candidate list (positive first) is
    ``targets[cand_index[cand_offsets[i]:cand_offsets[i + 1]]]``. `queries`/`targets` hold one row
    per distinct item and may be memory-mapped from the cache.
    """

    name: str
    queries: np.ndarray
    targets: np.ndarray
    query_index: np.ndarray
    cand_offsets: np.ndarray
    cand_index: np.ndarray

    @property
    def n_samples(self) -> int:
        return len(self.query_index)

    @property
    def candidate_counts(self) -> np.ndarray:
        """Length of each sample's candidate list."""
        return np.diff(self.cand_offsets)

    @property
    def positives(self) -> np.ndarray:
        """Target row of each sample's positive (the first candidate)."""
        return self.cand_index[self.cand_offsets[:-1]]

    def counts(self) -> dict[str, int]:
        """The exact sizes reported with every score (two runs can be checked for one protocol)."""
        cc = self.candidate_counts
        return {
            "queries": self.n_samples,
            "candidates_total": int(cc.sum()),
            "candidates_min": int(cc.min()) if len(cc) else 0,
            "candidates_max": int(cc.max()) if len(cc) else 0,
            "unique_queries": len(self.queries),
            "unique_targets": len(self.targets),
        }


@dataclass
class _Side:
    keys: dict[bytes, int] = field(default_factory=dict)
    order: list[bytes] = field(default_factory=list)
    pending: list[tuple[int, Item]] = field(default_factory=list)
    done_idx: list[np.ndarray] = field(default_factory=list)
    done_emb: list[np.ndarray] = field(default_factory=list)

    def index_of(self, item: Item, *, rank: int, world: int) -> int:
        key = item_key(item)
        idx = self.keys.get(key)
        if idx is None:
            idx = len(self.order)
            self.keys[key] = idx
            self.order.append(key)
            # Every rank numbers unique items identically (they read the same data in the same
            # order), so "index modulo world size" is a split that needs no communication.
            if idx % world == rank:
                self.pending.append((idx, item))
        return idx


class DatasetCollector:
    """Streams one dataset's samples into an `EncodedDataset`, encoding this rank's share.

    `add` records a sample; with `stream=True` pending unique items are encoded as soon as
    `sort_window` batches of them wait (memory holds at most that many items), otherwise they wait
    for `encode_pending` (the caller first checks the cache with `fingerprint`). Waiting items
    are encoded longest first in batches of similar length (`mmemb.batching`): less padding, the
    same rows. `finish` gathers every rank's embeddings on rank 0 and returns the dataset there
    (None elsewhere).
    """

    def __init__(
        self, name: str, encode: EncodeFn, *, batch_size: int, rank: int = 0, world: int = 1,
        stream: bool = True, sort_window: int = 16,
    ) -> None:
        if sort_window < 1:
            raise ValueError(f"sort_window must be >= 1 (got {sort_window})")
        self.name = name
        self.encode = encode
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.stream = stream
        self.sort_window = sort_window
        self.sides: dict[Side, _Side] = {"query": _Side(), "target": _Side()}
        # Compact int64 arrays: a 1000 x 1000 candidate set is a million entries.
        self.query_index = array("q")
        self.cand_offsets = array("q", [0])
        self.cand_index = array("q")
        self.encoded_items = 0

    def add(self, sample: Sample) -> None:
        """Record one sample (query + its candidate list, positive first)."""
        q, t = self.sides["query"], self.sides["target"]
        self.query_index.append(q.index_of(sample.query, rank=self.rank, world=self.world))
        cands = sample.candidates
        for item in cands:
            self.cand_index.append(t.index_of(item, rank=self.rank, world=self.world))
        self.cand_offsets.append(len(self.cand_index))
        if self.stream:
            for side in SIDES:
                if len(self.sides[side].pending) >= self.batch_size * self.sort_window:
                    self._encode_side(side)

    @property
    def n_samples(self) -> int:
        return len(self.query_index)

    def fingerprint(self) -> str:
        """A hash of the dataset's content as evaluated: name, every distinct item on each side
        (text, image, instruction) in order, and each sample's query and candidate list."""
        h = hashlib.sha256()
        h.update(b"mmemb-eval-data-v1\0" + self.name.encode() + b"\0")
        for side in SIDES:
            keys = self.sides[side].order
            h.update(side.encode() + len(keys).to_bytes(8, "little"))
            for key in keys:
                h.update(key)
        for arr in (self.query_index, self.cand_offsets, self.cand_index):
            h.update(np.asarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()

    def _encode_some(self, side: Side, n: int) -> None:
        s = self.sides[side]
        chunk, s.pending = s.pending[:n], s.pending[n:]
        if not chunk:
            return
        emb = np.asarray(self.encode([item for _, item in chunk], side), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(chunk):
            raise RuntimeError(
                f"the encoder returned shape {emb.shape} for {len(chunk)} items on side {side}"
            )
        s.done_idx.append(np.fromiter((i for i, _ in chunk), dtype=np.int64, count=len(chunk)))
        s.done_emb.append(emb)
        self.encoded_items += len(chunk)

    @property
    def pending_items(self) -> int:
        """Items of this rank's share not encoded yet."""
        return sum(len(s.pending) for s in self.sides.values())

    def _encode_side(self, side: Side, progress: Callable[[int], object] | None = None) -> None:
        """Encode every waiting item of `side`, longest first, a batch at a time. Each item
        carries its row index, so the sort needs no undoing."""
        s = self.sides[side]
        s.pending.sort(key=lambda entry: length_key(entry[1]), reverse=True)  # stable
        while s.pending:
            n = min(self.batch_size, len(s.pending))
            self._encode_some(side, n)
            if progress is not None:
                progress(n)

    def encode_pending(self, progress: Callable[[int], object] | None = None) -> None:
        """Encode every item still waiting (this rank's share), in batches of similar length;
        `progress(n)` is called after each batch with its size."""
        for side in SIDES:
            self._encode_side(side, progress)

    def finish(self) -> EncodedDataset | None:
        """Encode what is left, gather every rank's rows on rank 0; the dataset on rank 0."""
        self.encode_pending()
        if self.n_samples == 0:
            raise DataError(f"dataset {self.name!r} has no samples to evaluate")
        parts: dict[str, np.ndarray] = {}
        for side in SIDES:
            s = self.sides[side]
            idx = np.concatenate(s.done_idx) if s.done_idx else np.empty(0, dtype=np.int64)
            emb = np.concatenate(s.done_emb) if s.done_emb else None
            rows = _gather_rows(idx, emb, len(s.order), rank=self.rank, world=self.world,
                                what=f"{self.name} ({side})")
            if rows is not None:
                parts[side] = rows
        if self.rank != 0:
            return None
        return EncodedDataset(
            name=self.name,
            queries=parts["query"],
            targets=parts["target"],
            query_index=np.asarray(self.query_index, dtype=np.int64),
            cand_offsets=np.asarray(self.cand_offsets, dtype=np.int64),
            cand_index=np.asarray(self.cand_index, dtype=np.int64),
        )


def _gather_rows(
    idx: np.ndarray, emb: np.ndarray | None, n_total: int, *, rank: int, world: int, what: str
) -> np.ndarray | None:
    """Assemble the (n_total, D) matrix from every rank's (row indices, rows) on rank 0."""
    if world > 1:
        payload = (n_total, idx, emb)
        gathered: list[tuple[int, np.ndarray, np.ndarray | None]] | None = (
            [None] * world if rank == 0 else None  # type: ignore[list-item]
        )
        dist.gather_object(payload, gathered, dst=0)
        if rank != 0:
            return None
        assert gathered is not None
    else:
        gathered = [(n_total, idx, emb)]
    totals = {g[0] for g in gathered}
    if len(totals) != 1:
        # Ranks split the work by the order in which they saw items; if they saw different data
        # (different files on different nodes, non-deterministic reading) the split is wrong.
        raise DataError(
            f"{what}: ranks counted different numbers of distinct items ({sorted(totals)}); every "
            "rank must read the same eval data in the same order (a shared file system)."
        )
    dims = {g[2].shape[1] for g in gathered if g[2] is not None and len(g[2])}
    if len(dims) > 1:
        raise RuntimeError(f"{what}: ranks produced embeddings of different widths {sorted(dims)}")
    dim = dims.pop() if dims else 0
    out = np.zeros((n_total, dim), dtype=np.float32)
    filled = np.zeros(n_total, dtype=bool)
    for _, g_idx, g_emb in gathered:
        if g_emb is not None and len(g_idx):
            out[g_idx] = g_emb
            filled[g_idx] = True
    if not filled.all():
        raise RuntimeError(f"{what}: {int((~filled).sum())} items were not encoded by any rank")
    return out


def make_encode_fn(encoder: Encoder, *, batch_size: int, precision: str) -> EncodeFn:
    """An `EncodeFn` over `encoder.encode` (inference mode, batched) with the precision applied.

    "bf16" runs the forward under CUDA autocast in bfloat16 (the model's own weights are left as
    they are); "fp32" runs as is. Embeddings come back as float32 on the CPU either way.
    """
    device = next(encoder.parameters()).device

    def encode(items: Sequence[Item], side: Side) -> np.ndarray:
        if precision == "bf16" and device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = encoder.encode(list(items), side=side, batch_size=batch_size)
        else:
            out = encoder.encode(list(items), side=side, batch_size=batch_size)
        emb = out.float().cpu().numpy()
        if not np.isfinite(emb).all():
            raise DataError(
                f"the model produced NaN/inf embeddings for {len(items)} {side} items; check the "
                "checkpoint, or evaluate in float32 (--precision fp32)"
            )
        return emb

    return encode

"""The training stream: prepared shards -> mixed, shuffled, split, collated batches, resumable.

Shape (the design follows open_clip's WebDataset pipeline: shard-level splitting across ranks and
workers, optional resampling for an endless stream, per-epoch deterministic seeds, log-and-skip
decoding), with one change that makes exact resume cheap::

    per dataset: shard order ──> [split: rank × worker] ──> block shuffle ──> sample cursor
    per (rank, worker) slot:  weighted choice of a dataset per sample (or per batch when
                              task-homogeneous) ──> batch ──> decode + collate (in the worker)
    main process:             DataLoader round-robin over workers; records each worker's position

- **Splitting.** Every (rank, worker) pair is a *slot*. Without resampling, each dataset's shards
  are shuffled per epoch (seeded) and dealt to the slots (``shards[slot::slots]``), so across all
  ranks and workers every sample is read exactly once per epoch. With ``resample=True`` every slot
  draws shards with replacement (weighted by their sample counts) from its own seeded sequence:
  an endless stream that keeps every dataset in every slot however few shards there are.
- **Shuffling.** A slot reads a dataset as blocks of `shuffle_buffer` consecutive samples and emits
  each block in a seeded random order. Only tar *headers* are kept for a block (samples are read
  with seeks when emitted), so a large buffer costs little memory. Unlike a reservoir buffer, a
  block is rebuilt from two numbers, which is what makes resuming exact and cheap.
- **Mixing.** Each slot picks the dataset of the next sample (or of the whole next batch with
  ``task_homogeneous=True``, as VLM2Vec does) with probability proportional to its weight: a
  source's weight split over its datasets in proportion to their sizes. Without resampling a
  dataset that runs out leaves the mix and the others go on until all are done.
- **Robustness.** A sample whose json does not parse, whose member is missing, or whose image
  the processor cannot decode is logged, counted (`stats`) and replaced by the next one; a damaged
  shard contributes the samples before the damage.
- **Resume.** All randomness comes from counters hashed with the seed, so a slot's position is a
  handful of integers. Every batch carries its slot's position; the main process keeps the last
  one per worker plus which worker is next, and `state_dict()` returns them. After
  `load_state_dict()`, each worker starts exactly where it stopped and the round-robin starts at
  the right worker, so the batches continue exactly as if there had been no interruption (for the
  same world size, number of workers and data).
- **Equal steps.** Without resampling, ranks can have different numbers of batches; every rank
  computes all ranks' counts from the manifests and stops the epoch at the smallest
  (`steps_per_epoch`), so distributed training never waits on a rank that has run out.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmemb.data.schema import Sample
from mmemb.data.shards import (
    SampleLoc,
    decode_sample,
    read_manifest,
    read_members,
    scan_shard,
)
from mmemb.distributed import dist_env
from mmemb.errors import DataError, MmembError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_NO_SHUFFLE_BLOCK = 256  # samples indexed at a time when shuffling is off


# --------------------------------------------------------------------------------------------
# plan: what every process knows (from the manifests) and agrees on


@dataclass(frozen=True)
class StreamDataset:
    """One dataset of the stream: its shards (path, sample count) and mixing weight."""

    name: str
    shards: tuple[tuple[str, int], ...]
    weight: float

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.shards)


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by hashing `parts`: every random choice is a function of counters."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _weighted_choice(rng: random.Random, options: Sequence[int], weights: Sequence[float]) -> int:
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    return options[min(bisect.bisect_right(cum, rng.random() * total), len(options) - 1)]


def load_stream_datasets(
    sources: Sequence[tuple[str | os.PathLike[str], float] | Mapping[str, Any]],
) -> list[StreamDataset]:
    """Datasets of prepared directories given as ``(path, weight)`` pairs or ``{path, weight}``
    mappings. A directory's weight is shared by its datasets in proportion to their sizes."""
    out: list[StreamDataset] = []
    names: dict[str, int] = {}
    for entry in sources:
        if isinstance(entry, Mapping):
            path, weight = entry["path"], float(entry.get("weight", 1.0))
        else:
            path, weight = entry[0], float(entry[1])
        if not weight > 0:
            raise DataError(f"{path}: a data source needs a weight > 0 (got {weight}).")
        root = Path(path)
        doc = read_manifest(root)
        if doc.get("kind") == "eval":
            raise DataError(
                f"{root}: these are evaluation shards (kind 'eval': each query with its own "
                "candidate list); list them under data.eval, not data.train."
            )
        by_ds: dict[str, list[tuple[str, int]]] = {}
        for shard in doc["shards"]:
            if shard.get("pool"):
                continue
            if shard["samples"] > 0:
                by_ds.setdefault(shard["dataset"], []).append(
                    (str(root / shard["path"]), int(shard["samples"]))
                )
        total = sum(n for shards in by_ds.values() for _, n in shards)
        if total == 0:
            raise DataError(f"{root}: the prepared directory holds no samples.")
        missing = [p for shards in by_ds.values() for p, _ in shards if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{root}: {len(missing)} shard(s) listed in manifest.json are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Copy the whole "
                "directory, or re-run `mmemb prepare`."
            )
        for ds, shards in by_ds.items():
            name = ds
            if name in names:  # the same dataset name in two directories: keep both streams
                names[ds] += 1
                name = f"{ds}#{names[ds]}"
            else:
                names[ds] = 1
            n = sum(c for _, c in shards)
            out.append(StreamDataset(name, tuple(shards), weight * n / total))
    if not out:
        raise DataError("no training data: give at least one prepared directory.")
    return out


@dataclass(frozen=True)
class StreamPlan:
    """Everything a slot needs to produce its batches; identical in every process."""

    datasets: tuple[StreamDataset, ...]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (>= 1)
    shuffle_buffer: int
    resample: bool
    task_homogeneous: bool
    drop_last: bool

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def epoch_shards(self, d: int, epoch: int, slot: int) -> list[int]:
        """Indices of dataset `d`'s shards that `slot` reads in `epoch` (no resampling)."""
        order = list(range(len(self.datasets[d].shards)))
        _rng(self.seed, "shards", epoch, d).shuffle(order)
        return order[slot :: self.slots]

    def slot_batches(self, epoch: int, slot: int) -> int:
        """How many batches `slot` yields in `epoch` without resampling (from manifest counts)."""
        per_ds = []
        for d, ds in enumerate(self.datasets):
            per_ds.append(sum(ds.shards[i][1] for i in self.epoch_shards(d, epoch, slot)))
        b = self.batch_size
        if self.task_homogeneous:
            return sum(n // b if self.drop_last else -(-n // b) for n in per_ds)
        n = sum(per_ds)
        return n // b if self.drop_last else -(-n // b)

    def rank_batches(self, epoch: int, rank: int) -> int:
        return sum(self.slot_batches(epoch, self.slot(rank, w)) for w in range(self.workers))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same thing."""
        return {
            "datasets": [[d.name, len(d.shards), d.samples] for d in self.datasets],
            "batch_size": self.batch_size,
            "seed": self.seed,
            "world_size": self.world_size,
            "workers": self.workers,
            "shuffle_buffer": self.shuffle_buffer,
            "resample": self.resample,
            "task_homogeneous": self.task_homogeneous,
            "drop_last": self.drop_last,
        }


# --------------------------------------------------------------------------------------------
# one dataset read by one slot


@dataclass
class CursorPosition:
    """Where one slot stands in one dataset; a checkpoint's data state holds one per dataset.

    Samples are read in blocks (a shuffle buffer's worth): the current block starts at sample
    `offset` of the `shard`-th shard in the slot's shard order, and `emitted` samples of the block
    were handed out; `done` once this slot's part of the dataset is exhausted. A block is rebuilt
    from (`shard`, `offset`) alone (its shuffle is seeded by them), so these four numbers are the
    whole position. Saved with the short keys ``k``, ``o``, ``e``, ``done`` of the checkpoints
    written before this type existed, so old and new checkpoints load alike.
    """

    shard: int = 0
    offset: int = 0
    emitted: int = 0
    done: bool = False

    def to_state(self) -> dict[str, Any]:
        return {"k": self.shard, "o": self.offset, "e": self.emitted, "done": self.done}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> CursorPosition:
        st = state or {}
        return cls(shard=st.get("k", 0), offset=st.get("o", 0), emitted=st.get("e", 0),
                   done=st.get("done", False))


class _Cursor:
    """Reads dataset `d` for one slot, block by block, from a `CursorPosition`."""

    def __init__(
        self,
        plan: StreamPlan,
        d: int,
        slot: int,
        epoch: int,
        state: Mapping[str, Any] | None,
        stats: dict[str, int],
    ) -> None:
        self.plan = plan
        self.d = d
        self.slot = slot
        self.epoch = epoch
        self.stats = stats
        self.ds = plan.datasets[d]
        self.mine = None if plan.resample else plan.epoch_shards(d, epoch, slot)
        self.pos = CursorPosition.from_state(state)
        self._block: list[tuple[int, SampleLoc]] | None = None
        self._next: tuple[int, int] = (0, 0)  # (shard, offset) of the next block
        self._scans: OrderedDict[int, list[SampleLoc]] = OrderedDict()
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._cum: list[int] = []
        total = 0
        for _, n in self.ds.shards:
            total += n
            self._cum.append(total)

    @property
    def state(self) -> dict[str, Any]:
        return self.pos.to_state()

    @property
    def done(self) -> bool:
        return self.pos.done

    def _shard_at(self, k: int) -> int | None:
        if self.mine is not None:
            return self.mine[k] if k < len(self.mine) else None
        # Resampling: draw k of this slot, weighted by shard size (so samples are equally likely).
        rng = _rng(self.plan.seed, "resample", self.epoch, self.slot, self.d, k)
        return min(bisect.bisect_right(self._cum, rng.random() * self._cum[-1]), len(self._cum) - 1)

    def _scan(self, si: int) -> list[SampleLoc]:
        if si in self._scans:
            self._scans.move_to_end(si)
            return self._scans[si]
        path = self.ds.shards[si][0]
        locs, error = scan_shard(path)
        if error:
            self.stats["bad_shard"] = self.stats.get("bad_shard", 0) + 1
            log.warning(
                "damaged shard, using the %d samples before the damage: %s", len(locs), error
            )
        self._scans[si] = locs
        while len(self._scans) > 3:
            self._scans.popitem(last=False)
        return locs

    def _file(self, si: int) -> IO[bytes]:
        f = self._files.get(si)
        if f is None:
            f = open(self.ds.shards[si][0], "rb")  # noqa: SIM115 - LRU-closed below / in close()
            self._files[si] = f
            while len(self._files) > 4:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(si)
        return f

    def _build_block(self) -> list[tuple[int, SampleLoc]]:
        size = self.plan.shuffle_buffer if self.plan.shuffle_buffer > 1 else _NO_SHUFFLE_BLOCK
        block: list[tuple[int, SampleLoc]] = []
        pos = self.pos
        shard, offset = pos.shard, pos.offset
        empty_run = 0
        while len(block) < size:
            si = self._shard_at(shard)
            if si is None:
                break
            locs = self._scan(si)
            take = locs[offset : offset + size - len(block)]
            block += [(si, loc) for loc in take]
            offset += len(take)
            if offset >= len(locs):
                shard, offset = shard + 1, 0
                empty_run = 0 if take else empty_run + 1
                if empty_run > 1000:  # only possible when resampling unreadable shards
                    raise DataError(
                        f"dataset '{self.ds.name}': 1000 shards in a row yielded no samples; "
                        "the shards are damaged or empty. Re-run `mmemb prepare`."
                    )
        if self.plan.shuffle_buffer > 1:
            _rng(self.plan.seed, "block", self.epoch, self.slot, self.d, pos.shard,
                 pos.offset).shuffle(block)
        self._next = (shard, offset)  # where the next block starts
        return block

    def next(self) -> Sample | None:
        """The next sample, or None when this slot's part of the dataset is done."""
        pos = self.pos
        while not pos.done:
            if self._block is None:
                self._block = self._build_block()
                if not self._block:
                    pos.done = True
                    break
            if pos.emitted >= len(self._block):
                pos.shard, pos.offset = self._next
                pos.emitted = 0
                self._block = None
                continue
            si, loc = self._block[pos.emitted]
            pos.emitted += 1
            path = self.ds.shards[si][0]
            where = f"{path} sample '{loc.key}'"
            try:
                members = read_members(self._file(si), loc, path=path)
                sample = decode_sample(loc.key, members, where=path)
            except (DataError, OSError) as exc:
                self.stats["bad_sample"] = self.stats.get("bad_sample", 0) + 1
                log.warning("skipping a broken sample (%s): %s", where, exc)
                continue
            sample.meta.setdefault("shard", path)
            sample.meta.setdefault("key", loc.key)
            return sample
        return None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --------------------------------------------------------------------------------------------
# one slot: mixing, batching, collation


class _Slot:
    """The batches of one (rank, worker) in one epoch, from a saved position or the start."""

    def __init__(
        self,
        plan: StreamPlan,
        rank: int,
        worker: int,
        epoch: int,
        state: Mapping[str, Any] | None,
        collate: Callable[[list[Sample]], Any],
    ) -> None:
        self.plan = plan
        self.worker = worker
        self.slot = plan.slot(rank, worker)
        self.epoch = epoch
        self.collate = collate
        st = dict(state or {})
        self.draws: int = st.get("draws", 0)
        self.batches: int = st.get("batches", 0)
        self.samples: int = st.get("samples", 0)
        self.stats: dict[str, int] = dict(st.get("stats", {}))
        self._bad_run = 0
        saved = {int(k): v for k, v in st.get("cursors", {}).items()}
        self.cursors: dict[int, _Cursor] = {}
        for d in range(len(plan.datasets)):
            if not plan.resample and not plan.epoch_shards(d, epoch, self.slot):
                continue  # this slot has no shard of dataset d this epoch
            self.cursors[d] = _Cursor(plan, d, self.slot, epoch, saved.get(d), self.stats)

    def state(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "batches": self.batches,
            "samples": self.samples,
            "stats": dict(self.stats),
            "cursors": {str(d): c.state for d, c in self.cursors.items()},
        }

    def _choose(self) -> int | None:
        alive = [d for d, c in self.cursors.items() if not c.done]
        if not alive:
            return None
        rng = _rng(self.plan.seed, "mix", self.epoch, self.slot, self.draws)
        self.draws += 1
        return _weighted_choice(rng, alive, [self.plan.datasets[d].weight for d in alive])

    def _next_mixed(self) -> Sample | None:
        while True:
            d = self._choose()
            if d is None:
                return None
            sample = self.cursors[d].next()
            if sample is not None:
                return sample

    def _fill(self, batch: list[Sample], d: int | None) -> None:
        while len(batch) < self.plan.batch_size:
            sample = self._next_mixed() if d is None else self.cursors[d].next()
            if sample is None:
                return
            batch.append(sample)

    def _collate(self, batch: list[Sample], d: int | None) -> Any | None:
        """Collate; when that fails on bad data, drop the samples that fail alone and refill.

        A `MmembError` (e.g. too few negatives for the recipe) is a setup problem and propagates.
        So does a failure no single sample reproduces, or one every sample of a batch (> 1)
        reproduces: then the processor, not the data, is broken. Returns None when refilling
        ran out of data and a short batch is not wanted.
        """
        while batch:
            try:
                out = self.collate(batch)
                self._bad_run = 0
                return out
            except MmembError:
                raise
            except Exception:  # the processor decodes untrusted image bytes
                bad: list[tuple[Sample, Exception]] = []
                for s in batch:
                    try:
                        self.collate([s])
                    except MmembError:
                        raise
                    except Exception as one:  # noqa: BLE001
                        bad.append((s, one))
                if not bad or (len(bad) == len(batch) > 1):
                    raise
                self._bad_run += len(bad)
                if self._bad_run > 1000:  # consecutive failures: not a stray corrupt file
                    raise
                for s, err in bad:
                    self.stats["bad_sample"] = self.stats.get("bad_sample", 0) + 1
                    log.warning(
                        "skipping sample %r (%s, %s): the processor failed on it: %r",
                        s.id,
                        s.dataset,
                        s.meta.get("shard"),
                        err,
                    )
                drop = {id(s) for s, _ in bad}
                batch[:] = [s for s in batch if id(s) not in drop]
                self._fill(batch, d)
                if len(batch) < self.plan.batch_size and self.plan.drop_last:
                    self.stats["dropped_tail"] = self.stats.get("dropped_tail", 0) + len(batch)
                    return None
        return None

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan
        try:
            while True:
                d = self._choose() if plan.task_homogeneous else None
                if plan.task_homogeneous and d is None:
                    return
                batch: list[Sample] = []
                self._fill(batch, d)
                if not batch:
                    if d is None:
                        return
                    continue  # this dataset just ran out exactly at a batch boundary
                if len(batch) < plan.batch_size and plan.drop_last:
                    self.stats["dropped_tail"] = self.stats.get("dropped_tail", 0) + len(batch)
                    if d is None:
                        return
                    continue
                out = self._collate(batch, d)
                if out is None:
                    continue
                self.batches += 1
                self.samples += len(batch)
                yield out
        finally:
            for c in self.cursors.values():
                c.close()


# --------------------------------------------------------------------------------------------
# the DataLoader side


def _identity(x: Any) -> Any:
    return x


def _worker_init(worker_id: int) -> None:
    # Processors do small tensor ops; one intra-op thread per worker avoids oversubscribing the
    # cores the training process needs.
    torch.set_num_threads(1)


class _WorkerStream(IterableDataset):  # type: ignore[type-arg]
    """What each DataLoader worker runs: its logical slot from the saved position."""

    def __init__(
        self,
        plan: StreamPlan,
        epoch: int,
        states: Mapping[int, Any],
        rotation: int,
        collate: Callable[[list[Sample]], Any],
    ) -> None:
        self.plan = plan
        self.epoch = epoch
        self.states = dict(states)
        self.rotation = rotation
        self.collate = collate

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # Rotating logical ids makes the DataLoader's round-robin resume at the right worker.
        worker = (physical + self.rotation) % self.plan.workers
        slot = _Slot(
            self.plan, self.plan.rank, worker, self.epoch, self.states.get(worker), self.collate
        )
        for batch in slot:
            yield batch, {"worker": worker, "state": slot.state()}


class TrainStream:
    """Collated training batches from prepared shard directories, resumable exactly.

    Iterating yields batches from the current position to the end of `epochs` (``None``: forever;
    with ``resample=True`` the stream is endless anyway). `state_dict()` / `load_state_dict()`
    save and restore the position between batches.

    `sources` are prepared directories with their mixing weights, ``[(path, weight), ...]`` (see
    `load_stream_datasets`); `rank` and `world_size` default to this process's
    (`mmemb.distributed.dist_env`).
    """

    def __init__(
        self,
        sources: Sequence[tuple[str | os.PathLike[str], float] | Mapping[str, Any]],
        *,
        batch_size: int,
        collate: Callable[[list[Sample]], Any] = _identity,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        task_homogeneous: bool = False,
        drop_last: bool = True,
        epochs: int | None = None,
        equalize_ranks: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size}).")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0 (got {num_workers}).")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be >= 0 (got {shuffle_buffer}).")
        env = dist_env()  # the process group's ranks, else the launcher's (torchrun, srun)
        rank = env.rank if rank is None else rank
        world_size = env.world_size if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        self.plan = StreamPlan(
            datasets=tuple(load_stream_datasets(sources)),
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            workers=max(1, num_workers),
            shuffle_buffer=shuffle_buffer,
            resample=resample,
            task_homogeneous=task_homogeneous,
            drop_last=drop_last,
        )
        self.collate = collate
        self.num_workers = num_workers
        self.epochs = epochs
        self.equalize_ranks = equalize_ranks
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.epoch = 0
        self._past_stats: dict[str, int] = {}  # counters of finished epochs
        self._reset_position()
        self._warned_epochs: set[int] = set()

    # -- position
    def _reset_position(self) -> None:
        self.yielded = 0  # batches of this epoch given out
        self.next_worker = 0  # logical worker whose batch comes next
        self.worker_states: dict[int, dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        """The stream position (small, JSON-serialisable): save it with a checkpoint."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "yielded": self.yielded,
            "next_worker": self.next_worker,
            "workers": {str(w): s for w, s in self.worker_states.items()},
            "past_stats": dict(self._past_stats),
            "plan": self.plan.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`; the data, seed, batch size, world size and number of
        workers must be the ones it was saved with (else `DataError` says what differs)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data stream state version {state.get('version')} is not {STATE_VERSION}; it "
                "was saved by another mmemb version."
            )
        saved, now = state.get("plan", {}), self.plan.fingerprint()
        diffs = [
            f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]
        ]
        if diffs:
            raise DataError(
                "cannot resume the data stream exactly: " + "; ".join(diffs) + ". Resume with "
                "the same data, seed, batch size, world size and data.num_workers, or start the "
                "data from the beginning (drop the data position from the checkpoint)."
            )
        self.epoch = int(state["epoch"])
        self.yielded = int(state["yielded"])
        self.next_worker = int(state["next_worker"])
        self.worker_states = {int(w): dict(s) for w, s in state["workers"].items()}
        self._past_stats = dict(state.get("past_stats", {}))

    # -- sizes
    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per rank in the current epoch (None when resampling: the stream is endless)."""
        if self.plan.resample:
            return None
        return self._epoch_steps(self.epoch)

    def _epoch_steps(self, epoch: int) -> int:
        plan = self.plan
        mine = plan.rank_batches(epoch, plan.rank)
        if not self.equalize_ranks or plan.world_size == 1:
            return mine
        return min(plan.rank_batches(epoch, r) for r in range(plan.world_size))

    @property
    def samples_per_epoch(self) -> int:
        """Samples in all the data (one pass, all ranks)."""
        return sum(d.samples for d in self.plan.datasets)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of this epoch so far, summed over this rank's workers: samples, batches,
        bad_sample, bad_shard, dropped_tail."""
        out: dict[str, int] = {}
        for s in self.worker_states.values():
            out["samples"] = out.get("samples", 0) + s.get("samples", 0)
            out["batches"] = out.get("batches", 0) + s.get("batches", 0)
            for k, v in s.get("stats", {}).items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def total_stats(self) -> dict[str, int]:
        """`stats` summed over every epoch so far (including before a resume)."""
        out = dict(self._past_stats)
        for k, v in self.stats.items():
            out[k] = out.get(k, 0) + v
        return out

    # -- iteration
    def _check_epoch(self, steps: int | None) -> None:
        plan = self.plan
        if plan.resample or self.epoch in self._warned_epochs:
            return
        self._warned_epochs.add(self.epoch)
        if steps == 0:
            n_shards = {d.name: len(d.shards) for d in plan.datasets}
            raise DataError(
                f"rank {plan.rank} gets no complete batch of {plan.batch_size} in epoch "
                f"{self.epoch}: the data has {n_shards} shards for {plan.world_size} rank(s) x "
                f"{plan.workers} worker(s). Prepare with a smaller --shard-size, use fewer "
                "workers, or set data.resample: true."
            )
        if self.epoch == 0:
            few = [d.name for d in plan.datasets if len(d.shards) < plan.slots]
            if few:
                log.warning(
                    "datasets with fewer shards than ranks x workers (%d): %s. Some slots will "
                    "not see them each epoch; prepare with a smaller --shard-size or set "
                    "resample for every slot to mix every dataset.",
                    plan.slots,
                    ", ".join(few),
                )
        if plan.world_size > 1 and self.equalize_ranks:
            mine = plan.rank_batches(self.epoch, plan.rank)
            if steps is not None and mine > steps:
                log.info(
                    "epoch %d: rank %d stops after %d of its %d batches so that all ranks "
                    "take the same number of steps",
                    self.epoch,
                    plan.rank,
                    steps,
                    mine,
                )

    def _batches(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        stream = _WorkerStream(
            self.plan, self.epoch, self.worker_states, self.next_worker, self.collate
        )
        if self.num_workers == 0:
            return iter(stream)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_worker_init,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan
        while self.epochs is None or self.epoch < self.epochs:
            steps = None if plan.resample else self._epoch_steps(self.epoch)
            self._check_epoch(steps)
            it = self._batches()
            try:
                while steps is None or self.yielded < steps:
                    try:
                        batch, tag = next(it)
                    except StopIteration:
                        break
                    worker = tag["worker"]
                    self.worker_states[worker] = tag["state"]
                    self.next_worker = (worker + 1) % plan.workers
                    self.yielded += 1
                    yield batch
            finally:
                del it  # shuts the workers down
            self._past_stats = self.total_stats
            self.epoch += 1
            self._reset_position()


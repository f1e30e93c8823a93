"""Training stream: splitting, shuffling, mixing, homogeneous batches, tolerance, exact resume."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmemb.data.collate import Collator
from mmemb.data.schema import Item, Sample
from mmemb.data.shards import ShardWriter, write_json_atomic
from mmemb.data.stream import TrainStream
from mmemb.data.testing import ByteProcessor, jpeg_bytes, text_samples
from mmemb.errors import DataError


def _prepared(
    directory: Path,
    sizes: dict[str, int],
    *,
    shard_size: int = 10,
    kind: str = "train",
    samples: list[Sample] | None = None,
) -> Path:
    if samples is None:
        samples = [s for name, n in sizes.items() for s in text_samples(n, dataset=name)]
    with ShardWriter(directory, max_samples=shard_size) as writer:
        for s in samples:
            writer.write(s)
    write_json_atomic(directory / "manifest.json", writer.manifest(kind=kind))
    return directory


def _ids(batch: list[Sample]) -> list[str]:
    return [s.id for s in batch]


def _take(it: Iterator[list[Sample]], n_batches: int) -> list[str]:
    out: list[str] = []
    for _ in range(n_batches):
        out += _ids(next(it))
    return out


@pytest.fixture
def two_sets(tmp_path: Path) -> Path:
    return _prepared(tmp_path / "ab", {"a": 70, "b": 50}, shard_size=10)


# ----------------------------------------------------------------------------- resume

RESUME_CASES = {
    "epoch-shuffled": dict(shuffle_buffer=16),
    "no-shuffle": dict(shuffle_buffer=0),
    "resample-homogeneous": dict(resample=True, task_homogeneous=True, shuffle_buffer=8),
    "two-ranks": dict(rank=1, world_size=2, shuffle_buffer=16),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_exact(two_sets: Path, case: str) -> None:
    """Read 100 samples, save, restore into a new stream, read 50 == samples 100..150 of one run.

    120 samples, so without resampling the 150 cross into the second epoch."""
    kw: dict[str, Any] = dict(batch_size=5, seed=3, **RESUME_CASES[case])
    if "world_size" in kw:  # half the data per rank: read 50 + 25 instead
        full_it = iter(TrainStream([(two_sets, 1.0)], **kw, drop_last=False))
        full = _take(full_it, 30)
        first = TrainStream([(two_sets, 1.0)], **kw, drop_last=False)
        it = iter(first)
        _take(it, 20)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = TrainStream([(two_sets, 1.0)], **kw, drop_last=False)
        resumed.load_state_dict(state)
        assert _take(iter(resumed), 10) == full[100:150]
        return
    full = _take(iter(TrainStream([(two_sets, 1.0)], **kw)), 30)
    first = TrainStream([(two_sets, 1.0)], **kw)
    head = _take(iter(first), 20)
    assert head == full[:100]
    state = json.loads(json.dumps(first.state_dict()))  # small and JSON-serialisable
    assert len(json.dumps(state)) < 4000
    resumed = TrainStream([(two_sets, 1.0)], **kw)
    resumed.load_state_dict(state)
    assert _take(iter(resumed), 10) == full[100:150]


# The data state of a checkpoint written before the cursor position became a named type
# (CursorPosition): two_sets, batch_size=5, seed=3, shuffle_buffer=16, after 20 batches.
OLD_DATA_STATE = (
    '{"version":1,"epoch":0,"yielded":20,"next_worker":0,"workers":{"0":{"draws":100,'
    '"batches":20,"samples":100,"stats":{},"cursors":{"0":{"k":4,"o":8,"e":6,"done":false},'
    '"1":{"k":3,"o":2,"e":14,"done":false}}}},"past_stats":{},"plan":{"datasets":[["a",7,70],'
    '["b",5,50]],"batch_size":5,"seed":3,"world_size":1,"workers":1,"shuffle_buffer":16,'
    '"resample":false,"task_homogeneous":false,"drop_last":true}}'
)


def test_an_old_checkpoints_data_state_still_loads(two_sets: Path) -> None:
    """Saved positions keep their keys (k, o, e, done): an old state resumes exactly where the
    uninterrupted stream goes on, and a new state is written in the same form."""
    kw: dict[str, Any] = dict(batch_size=5, seed=3, shuffle_buffer=16)
    full = _take(iter(TrainStream([(two_sets, 1.0)], **kw)), 21)
    resumed = TrainStream([(two_sets, 1.0)], **kw)
    resumed.load_state_dict(json.loads(OLD_DATA_STATE))
    assert _take(iter(resumed), 1) == full[100:105] == ["b-35", "a-53", "a-10", "a-39", "a-13"]
    first = TrainStream([(two_sets, 1.0)], **kw)
    _take(iter(first), 20)
    assert first.state_dict() == json.loads(OLD_DATA_STATE)


@pytest.mark.distributed
def test_resume_is_exact_with_two_workers(tmp_path: Path) -> None:
    # Each worker gets 4 + 2 shards of 10 = 15 batches of 4. After 100 samples (25 batches:
    # 13 from worker 0, 12 from worker 1) both still have batches and it is worker 1's turn.
    two_sets = _prepared(tmp_path / "ab", {"a": 80, "b": 40}, shard_size=10)
    kw: dict[str, Any] = dict(batch_size=4, seed=1, num_workers=2, shuffle_buffer=16)
    full = _take(iter(TrainStream([(two_sets, 1.0)], **kw)), 38)
    first = TrainStream([(two_sets, 1.0)], **kw)
    it = iter(first)
    assert _take(it, 25) == full[:100]
    state = first.state_dict()
    assert state["next_worker"] == 1
    del it
    resumed = TrainStream([(two_sets, 1.0)], **kw)
    resumed.load_state_dict(state)
    assert _take(iter(resumed), 13)[:50] == full[100:150]


def test_resume_refuses_a_different_setup(two_sets: Path) -> None:
    s = TrainStream([(two_sets, 1.0)], batch_size=5)
    next(iter(s))
    other = TrainStream([(two_sets, 1.0)], batch_size=4)
    with pytest.raises(DataError, match="batch_size: saved 5, now 4"):
        other.load_state_dict(s.state_dict())


# ----------------------------------------------------------------------------- splitting


def _epoch_ids(path: Path, *, rank: int, world_size: int, num_workers: int) -> list[str]:
    stream = TrainStream(
        [(path, 1.0)],
        batch_size=3,
        seed=7,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        epochs=1,
        drop_last=False,
        equalize_ranks=False,
    )
    return [i for b in stream for i in _ids(b)]


@pytest.mark.distributed
def test_two_ranks_two_workers_see_every_sample_once(two_sets: Path) -> None:
    seen = _epoch_ids(two_sets, rank=0, world_size=2, num_workers=2)
    seen += _epoch_ids(two_sets, rank=1, world_size=2, num_workers=2)
    assert len(seen) == 120
    assert sorted(seen) == sorted(
        s.id for n, c in (("a", 70), ("b", 50)) for s in text_samples(c, dataset=n)
    )


def test_slots_partition_the_data(two_sets: Path) -> None:
    """Same property in-process: 4 ranks x 1 worker; every sample exactly once per epoch."""
    seen = [i for r in range(4) for i in _epoch_ids(two_sets, rank=r, world_size=4, num_workers=0)]
    assert len(seen) == len(set(seen)) == 120


def test_epochs_reshuffle_and_seeds_decide(two_sets: Path) -> None:
    stream = TrainStream([(two_sets, 1.0)], batch_size=10, seed=0, epochs=2)
    ids = [i for b in stream for i in _ids(b)]
    e0, e1 = ids[:120], ids[120:]
    assert sorted(e0) == sorted(e1) and e0 != e1
    again = [
        i for b in TrainStream([(two_sets, 1.0)], batch_size=10, seed=0, epochs=1) for i in _ids(b)
    ]
    other = [
        i for b in TrainStream([(two_sets, 1.0)], batch_size=10, seed=1, epochs=1) for i in _ids(b)
    ]
    assert again == e0 and other != e0


def test_ranks_take_equal_steps(tmp_path: Path) -> None:
    path = _prepared(tmp_path / "u", {"a": 53}, shard_size=10)  # shards of 10,10,10,10,10,3
    counts = []
    for rank in range(2):
        stream = TrainStream([(path, 1.0)], batch_size=4, rank=rank, world_size=2, epochs=1)
        counts.append((stream.steps_per_epoch, sum(1 for _ in stream)))
    assert counts[0] == counts[1]
    assert counts[0][0] == counts[0][1] > 0


def test_too_few_shards_for_the_slots_is_explained(tmp_path: Path) -> None:
    path = _prepared(tmp_path / "one", {"a": 8}, shard_size=100)
    stream = TrainStream([(path, 1.0)], batch_size=4, rank=1, world_size=2, epochs=1)
    with pytest.raises(DataError, match="resample"):
        next(iter(stream))


# ----------------------------------------------------------------------------- mixing


def test_weighted_mixing_proportions(tmp_path: Path) -> None:
    a = _prepared(tmp_path / "a", {"a": 200}, shard_size=20)
    b = _prepared(tmp_path / "b", {"b": 200}, shard_size=20)
    stream = TrainStream(
        [(a, 3.0), (b, 1.0)], batch_size=20, seed=5, resample=True, shuffle_buffer=50
    )
    it = iter(stream)
    datasets = Counter(s.dataset for _ in range(100) for s in next(it))
    share = datasets["a"] / (datasets["a"] + datasets["b"])
    assert abs(share - 0.75) < 0.04, datasets  # 2000 draws: 4 standard deviations


def test_directory_weight_is_shared_by_dataset_size(tmp_path: Path) -> None:
    path = _prepared(tmp_path / "ab", {"a": 300, "b": 100}, shard_size=25)
    it = iter(TrainStream([(path, 1.0)], batch_size=20, resample=True, shuffle_buffer=50))
    datasets = Counter(s.dataset for _ in range(100) for s in next(it))
    assert abs(datasets["a"] / 2000 - 0.75) < 0.04, datasets


def test_task_homogeneous_batches(two_sets: Path) -> None:
    stream = TrainStream([(two_sets, 1.0)], batch_size=8, seed=2, task_homogeneous=True, epochs=1)
    batches = list(stream)
    assert all(len({s.dataset for s in b}) == 1 for b in batches)
    assert {b[0].dataset for b in batches} == {"a", "b"}
    # 70 // 8 + 50 // 8 full batches; the tails (6 + 2) are dropped and counted
    assert len(batches) == stream_steps(two_sets) == 8 + 6


def stream_steps(path: Path) -> int:
    return TrainStream([(path, 1.0)], batch_size=8, task_homogeneous=True).steps_per_epoch or 0


def test_refuses_eval_shards(tmp_path: Path) -> None:
    path = _prepared(tmp_path / "ev", {"a": 5}, kind="eval")
    with pytest.raises(DataError, match="data.eval"):
        TrainStream([(path, 1.0)], batch_size=2)


# ----------------------------------------------------------------------------- robustness


def test_broken_json_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    path = _prepared(tmp_path / "d", {"a": 30}, shard_size=30)
    shard = path / "a-000000.tar"
    data = shard.read_bytes()
    marker = b'{"id":"a-7"'
    pos = data.index(marker)
    shard.write_bytes(data[:pos] + b"#" * len(marker) + data[pos + len(marker) :])  # same size
    stream = TrainStream([(path, 1.0)], batch_size=1, epochs=1, shuffle_buffer=10)
    ids = [i for b in stream for i in _ids(b)]
    assert len(ids) == 29 and "a-7" not in ids
    assert stream.total_stats["bad_sample"] == 1


def test_corrupt_image_is_skipped_in_collation(tmp_path: Path) -> None:
    samples = [
        Sample(id=f"s{i}", dataset="img", query=Item(text=f"q{i}"), pos=Item(image=jpeg_bytes(i)))
        for i in range(12)
    ]
    truncated = jpeg_bytes(99)[:60]  # JPEG magic, but cut off: PIL cannot decode it
    samples[5] = Sample(id="s5", dataset="img", query=Item(text="q5"), pos=Item(image=truncated))
    path = _prepared(tmp_path / "img", {}, samples=samples, shard_size=100)
    stream = TrainStream(
        [(path, 1.0)],
        batch_size=4,
        epochs=1,
        shuffle_buffer=0,
        collate=Collator(ByteProcessor(), num_negatives=0),
        drop_last=False,
    )
    batches = list(stream)
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == sorted(f"s{i}" for i in range(12) if i != 5)
    assert [len(b) for b in batches] == [4, 4, 3]  # the bad one was replaced by the next sample
    assert stream.total_stats["bad_sample"] == 1


def test_a_broken_processor_is_not_mistaken_for_bad_data(two_sets: Path) -> None:
    def broken(samples: list[Sample]) -> Any:
        raise RuntimeError("processor bug")

    stream = TrainStream([(two_sets, 1.0)], batch_size=4, collate=broken)
    with pytest.raises(RuntimeError, match="processor bug"):
        next(iter(stream))


def test_too_few_negatives_propagates(two_sets: Path) -> None:
    stream = TrainStream(
        [(two_sets, 1.0)], batch_size=4, collate=Collator(ByteProcessor(), num_negatives=5)
    )
    with pytest.raises(DataError, match="train.negatives"):
        next(iter(stream))

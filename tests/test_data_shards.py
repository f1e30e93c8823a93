"""Shard writer, manifest and sequential reader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mmemb.data.schema import SCHEMA_VERSION, Item, Sample
from mmemb.data.shards import (
    ShardWriter,
    iter_samples,
    read_manifest,
    scan_shard,
    sha256_file,
    verify_checksums,
    write_json_atomic,
)
from mmemb.data.testing import jpeg_bytes, png_bytes, text_samples
from mmemb.errors import DataError


def _mixed_samples() -> list[Sample]:
    return [
        Sample(
            id="a/1",
            dataset="img set",
            query=Item(text="find it", image=jpeg_bytes(1), instruction="Retrieve."),
            pos=Item(image=png_bytes(2)),
            negs=[
                Item(image=jpeg_bytes(3)),
                Item(text="a text negative"),
                Item(image=png_bytes(4)),
            ],
            meta={"origin": {"file": "x.jsonl", "line": 3}, "score": 0.5},
        ),
        Sample(id="a/2", dataset="img set", query=Item(text="ünïcode ✓"), pos=Item(text="p")),
    ]


def _write(directory: Path, samples: list[Sample], **kw: object) -> dict:
    with ShardWriter(directory, **kw) as writer:  # type: ignore[arg-type]
        for s in samples:
            writer.write(s)
    manifest = writer.manifest(kind="train")
    write_json_atomic(directory / "manifest.json", manifest)
    return manifest


def test_roundtrip_keeps_bytes_and_fields(tmp_path: Path) -> None:
    samples = _mixed_samples()
    _write(tmp_path, samples)
    back = list(iter_samples(tmp_path))
    assert back == samples  # dataclass equality: every text, instruction, image byte and meta


def test_member_layout_matches_the_spec(tmp_path: Path) -> None:
    _write(tmp_path, _mixed_samples())
    shard = next(tmp_path.glob("*.tar"))
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    assert names[:5] == [
        "000000000.json",
        "000000000.q.jpg",
        "000000000.pos.png",
        "000000000.neg0.jpg",
        "000000000.neg2.png",
    ]
    assert names[5:] == ["000000001.json"]
    assert shard.name == "img_set-000000.tar"  # dataset name made file-safe


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    samples = _mixed_samples()
    _write(tmp_path, samples)
    shard = str(next(tmp_path.glob("*.tar")))
    got = list(wds.WebDataset(shard, shardshuffle=False))
    assert [g["__key__"] for g in got] == ["000000000", "000000001"]
    assert got[0]["q.jpg"] == samples[0].query.image
    assert got[0]["neg2.png"] == samples[0].negs[2].image
    assert json.loads(got[1]["json"])["query"]["text"] == "ünïcode ✓"


def test_manifest_counts_shards_and_checksums(tmp_path: Path) -> None:
    samples = text_samples(25, dataset="a") + text_samples(7, dataset="b", negatives=0)
    manifest = _write(tmp_path, samples, max_samples=10)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["samples"] == 32
    assert manifest["datasets"]["a"]["samples"] == 25 and manifest["datasets"]["a"]["shards"] == 3
    assert manifest["datasets"]["b"]["negatives"] == {"min": 0, "max": 0}
    assert manifest["datasets"]["a"]["negatives"] == {"min": 2, "max": 2}
    assert manifest["datasets"]["a"]["modalities"]["query"] == {"text": 25}
    shards = manifest["shards"]
    assert [(s["dataset"], s["samples"]) for s in shards] == [
        ("a", 10),
        ("a", 10),
        ("a", 5),
        ("b", 7),
    ]
    for s in shards:  # the recorded digest is the file's digest (computed while writing)
        assert sha256_file(tmp_path / s["path"]) == s["sha256"]
        assert (tmp_path / s["path"]).stat().st_size == s["bytes"]
    assert verify_checksums(tmp_path) == []
    assert read_manifest(tmp_path)["samples"] == 32


def test_checksum_mismatch_is_found(tmp_path: Path) -> None:
    manifest = _write(tmp_path, text_samples(5))
    path = tmp_path / manifest["shards"][0]["path"]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # flip bits inside the first member's data, size unchanged
    path.write_bytes(bytes(data))
    problems = verify_checksums(tmp_path)
    assert len(problems) == 1 and "sha256" in problems[0]
    with pytest.raises(DataError, match="do not match the manifest"):
        list(iter_samples(tmp_path, verify=True))


def test_identical_samples_give_identical_shards(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", _mixed_samples())
    b = _write(tmp_path / "b", _mixed_samples())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_byte_size_limit_rotates_shards(tmp_path: Path) -> None:
    samples = [
        Sample(
            id=str(i), dataset="d", query=Item(image=jpeg_bytes(i, (64, 64))), pos=Item(text="x")
        )
        for i in range(6)
    ]
    manifest = _write(tmp_path, samples, max_samples=None, max_bytes=4000)
    counts = [s["samples"] for s in manifest["shards"]]
    assert sum(counts) == 6 and len(counts) > 1


def test_pooled_images_are_stored_once(tmp_path: Path) -> None:
    shared = [Item(image=png_bytes(i)) for i in range(4)]
    samples = [
        Sample(
            id=str(i),
            dataset="ev",
            query=Item(text=f"q{i}"),
            pos=shared[i % 4],
            negs=[c for c in shared if c is not shared[i % 4]],
        )
        for i in range(8)
    ]
    manifest = _write(tmp_path, samples, pool_images=True)
    pools = [s for s in manifest["shards"] if s.get("pool")]
    assert len(pools) == 1 and pools[0]["images"] == 4  # 32 image slots, 4 distinct images
    assert list(iter_samples(tmp_path)) == samples
    data_shard = next(s for s in manifest["shards"] if not s.get("pool"))
    with pytest.raises(DataError, match="no pool shards"):
        list(iter_samples(tmp_path / data_shard["path"]))  # a single shard lacks the pool


def test_dataset_named_pool_does_not_clash(tmp_path: Path) -> None:
    samples = [Sample(id="1", dataset="pool", query=Item(text="q"), pos=Item(image=png_bytes()))]
    manifest = _write(tmp_path, samples, pool_images=True)
    paths = [s["path"] for s in manifest["shards"]]
    assert len(set(paths)) == 2
    assert list(iter_samples(tmp_path)) == samples


def test_truncated_shard(tmp_path: Path) -> None:
    manifest = _write(tmp_path, text_samples(20))
    path = tmp_path / manifest["shards"][0]["path"]
    path.write_bytes(path.read_bytes()[:5000])
    locs, error = scan_shard(path)
    assert error is not None and 0 < len(locs) < 20  # the samples before the damage survive
    with pytest.raises(DataError, match="damaged"):
        list(iter_samples(tmp_path))


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "mmemb-shards", "schema_version": 99}')
    with pytest.raises(DataError, match="schema version 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the manifest"):
        read_manifest(tmp_path)


def test_non_serialisable_meta_is_a_clear_error(tmp_path: Path) -> None:
    bad = Sample(
        id="x", dataset="d", query=Item(text="q"), pos=Item(text="p"), meta={"when": object()}
    )
    with ShardWriter(tmp_path) as writer, pytest.raises(DataError, match="JSON-serialisable"):
        writer.write(bad)


def test_header_scan_agrees_with_tarfile_and_handles_pax(tmp_path: Path) -> None:
    from mmemb.data.shards.tar_index import _group, _scan_tarfile

    manifest = _write(tmp_path, _mixed_samples() + text_samples(30, dataset="img set"))
    path = tmp_path / manifest["shards"][0]["path"]
    fast, error = scan_shard(path)
    assert error is None and len(fast) == 32
    assert (fast, None) == _group(_scan_tarfile(path), path)
    # a shard written by another tool, with a pax header (a long name): still read correctly
    long_key = "k" * 120
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{long_key}.json", b"{}"), (f"{long_key}.q.jpg", jpeg_bytes(0))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    locs, error = scan_shard(other)
    assert error is None and [(loc.key, [m[0] for m in loc.members]) for loc in locs] == [
        (long_key, ["json", "q.jpg"])
    ]

"""`ShardWriter`: samples -> ``{dataset}-NNNNNN.tar`` shards with fixed tar metadata, and the
manifest describing them (counts per dataset, each shard's size and sha256)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mmemb import __version__
from mmemb.data.images import image_ext
from mmemb.data.schema import SCHEMA_VERSION, Sample
from mmemb.data.shards.codec import encode_sample
from mmemb.data.shards.manifest import FORMAT, POOL_PREFIX, PathLike

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A file-name-safe form of a dataset name ('MSCOCO/i2t' -> 'MSCOCO_i2t')."""
    safe = _SAFE_RE.sub("_", name).strip("._") or "dataset"
    return safe


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through (so a shard's sha256 needs no
    second read of a multi-GB file)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        super().close()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # fixed metadata: identical samples give identical shards and checksums
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class _OpenShard:
    path: Path
    hashing: _HashingFile
    tar: tarfile.TarFile
    dataset: str
    samples: int = 0


@dataclass
class DatasetStats:
    """Counts kept per dataset while writing; they go into the manifest."""

    samples: int = 0
    shards: int = 0
    negatives_min: int | None = None
    negatives_max: int = 0
    modalities: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"query": {}, "pos": {}, "negs": {}}
    )

    def add(self, sample: Sample) -> None:
        self.samples += 1
        k = len(sample.negs)
        self.negatives_min = k if self.negatives_min is None else min(self.negatives_min, k)
        self.negatives_max = max(self.negatives_max, k)
        for role, items in (
            ("query", [sample.query]),
            ("pos", [sample.pos]),
            ("negs", sample.negs),
        ):
            for item in items:
                table = self.modalities[role]
                table[item.modality] = table.get(item.modality, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "shards": self.shards,
            "negatives": {"min": self.negatives_min or 0, "max": self.negatives_max},
            "modalities": self.modalities,
        }


class ShardWriter:
    """Writes samples into ``{dataset}-NNNNNN.tar`` shards in `directory`.

    A shard is closed when it holds `max_samples` samples or about `max_bytes` bytes (whichever
    comes first; a single sample larger than `max_bytes` still gets a shard of its own). Each
    dataset has its own shard series. With `pool_images=True` (eval sets, whose candidate lists
    repeat the same images across queries), every distinct image is stored once in
    ``pool-NNNNNN.tar`` and samples reference it by sha1.

    Use as a context manager or call `close()`; `shards` then lists every shard for the manifest.
    Members are written to the final names directly: atomicity comes from `prepare` writing into a
    staging directory that is renamed only when complete.
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        max_samples: int | None = 1000,
        max_bytes: int | None = 1 << 30,
        pool_images: bool = False,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (got {max_samples})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (got {max_bytes})")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.pool_images = pool_images
        self.shards: list[dict[str, Any]] = []
        self.datasets: dict[str, DatasetStats] = {}
        self._open: dict[str, _OpenShard] = {}
        self._next_index: dict[str, int] = {}
        # file-safe prefix -> dataset: two datasets with one prefix (or a dataset called 'pool')
        # must not share file names
        self._names: dict[str, str] = {POOL_PREFIX: "\0pool"}
        self._pool_seen: set[str] = set()
        self._closed = False

    # -- shard files
    def _prefix(self, dataset: str) -> str:
        prefix = safe_name(dataset)
        owner = self._names.setdefault(prefix, dataset)
        if owner != dataset:  # 'a/b' and 'a_b' would share file names: disambiguate by hash
            prefix = f"{prefix}_{hashlib.sha1(dataset.encode()).hexdigest()[:8]}"
            self._names.setdefault(prefix, dataset)
        return prefix

    def _new_shard(self, dataset: str, prefix: str) -> _OpenShard:
        index = self._next_index.get(prefix, 0)
        self._next_index[prefix] = index + 1
        path = self.directory / f"{prefix}-{index:06d}.tar"
        hashing = _HashingFile(open(path, "wb"))  # noqa: SIM115 - closed in _close_shard
        tar = tarfile.open(  # noqa: SIM115 - closed in _close_shard
            fileobj=hashing,  # type: ignore[arg-type]
            mode="w",
            format=tarfile.PAX_FORMAT,
        )
        return _OpenShard(path, hashing, tar, dataset)

    def _close_shard(self, shard: _OpenShard, *, pool: bool = False) -> None:
        shard.tar.close()
        shard.hashing.close()
        entry: dict[str, Any] = {
            "path": shard.path.name,
            "dataset": shard.dataset,
            "samples": shard.samples,
            "bytes": shard.hashing.size,
            "sha256": shard.hashing.sha.hexdigest(),
        }
        if pool:
            entry = {
                "path": shard.path.name,
                "pool": True,
                "images": shard.samples,
                "bytes": shard.hashing.size,
                "sha256": shard.hashing.sha.hexdigest(),
            }
        else:
            self.datasets[shard.dataset].shards += 1
        self.shards.append(entry)

    def _full(self, shard: _OpenShard) -> bool:
        if self.max_samples is not None and shard.samples >= self.max_samples:
            return True
        return self.max_bytes is not None and shard.hashing.size >= self.max_bytes

    def _shard_for(self, dataset: str, prefix: str, key: str) -> _OpenShard:
        shard = self._open.get(key)
        if shard is not None and self._full(shard):
            self._close_shard(shard, pool=key == "\0pool")
            shard = None
        if shard is None:
            shard = self._new_shard(dataset, prefix)
            self._open[key] = shard
        return shard

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    # -- public
    def write(self, sample: Sample) -> None:
        """Append one sample to its dataset's current shard."""
        if self._closed:
            raise RuntimeError("ShardWriter.write after close()")
        pool: dict[str, bytes] | None = {} if self.pool_images else None
        data, members = encode_sample(sample, pool=pool)
        if pool:
            for digest, image in pool.items():
                if digest in self._pool_seen:
                    continue
                self._pool_seen.add(digest)
                pshard = self._shard_for(POOL_PREFIX, POOL_PREFIX, "\0pool")
                self._add(pshard.tar, f"{digest}.{image_ext(image)}", image)
                pshard.samples += 1
        stats = self.datasets.setdefault(sample.dataset, DatasetStats())
        shard = self._shard_for(sample.dataset, self._prefix(sample.dataset), sample.dataset)
        key = f"{stats.samples:09d}"
        self._add(shard.tar, f"{key}.json", data)
        for ext, image in members:
            self._add(shard.tar, f"{key}.{ext}", image)
        shard.samples += 1
        stats.add(sample)

    def close(self) -> list[dict[str, Any]]:
        """Close every open shard; returns the shard list for the manifest."""
        if not self._closed:
            for key, shard in list(self._open.items()):
                self._close_shard(shard, pool=key == "\0pool")
            self._open.clear()
            self._closed = True
        return self.shards

    def abort(self) -> None:
        """Close files without recording them (the caller removes the directory)."""
        for shard in self._open.values():
            try:
                shard.tar.close()
                shard.hashing.close()
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
        self._open.clear()
        self._closed = True

    @property
    def written(self) -> int:
        return sum(s.samples for s in self.datasets.values())

    def manifest(self, **extra: Any) -> dict[str, Any]:
        """The manifest for what was written (call after `close`); `extra` keys are added."""
        if not self._closed:
            raise RuntimeError("ShardWriter.manifest() before close()")
        doc: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "mmemb_version": __version__,
            "samples": self.written,
            "datasets": {name: s.to_json() for name, s in sorted(self.datasets.items())},
            "shards": self.shards,
        }
        doc.update(extra)
        return doc

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

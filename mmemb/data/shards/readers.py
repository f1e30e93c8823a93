"""Plain sequential reading of prepared shards: every sample, in manifest order, exactly (a
damaged shard or sample is an error naming it), with pooled images looked up by sha1."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from mmemb.data.schema import Sample
from mmemb.data.shards.codec import decode_sample, split_key
from mmemb.data.shards.manifest import MANIFEST_NAME, PathLike, read_manifest, verify_checksums
from mmemb.data.shards.tar_index import scan_shard
from mmemb.errors import DataError


def iter_shard_members(path: PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, read sequentially."""
    cur_key: str | None = None
    cur: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:  # stream mode: one forward pass
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if key != cur_key:
                    if cur_key is not None:
                        yield cur_key, cur
                    cur_key, cur = key, {}
                f = tar.extractfile(info)
                assert f is not None
                cur[ext] = f.read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(
            f"{path}: the shard is damaged ({type(exc).__name__}: {exc}). "
            "Re-run `mmemb prepare`, or check the disk."
        ) from exc
    if cur_key is not None:
        yield cur_key, cur


class ImagePool:
    """Images stored once in ``pool-*.tar`` shards, looked up by sha1 (indexed lazily)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._index: dict[str, tuple[Path, int, int]] | None = None
        self._files: dict[Path, IO[bytes]] = {}

    def _build(self) -> dict[str, tuple[Path, int, int]]:
        index = {}
        for path in self.paths:
            locs, error = scan_shard(path)
            if error:
                raise DataError(f"image pool shard is damaged: {error}. Re-run `mmemb prepare`.")
            for loc in locs:
                _, offset, size = loc.members[0]
                index[loc.key] = (path, offset, size)
        return index

    def get(self, digest: str, *, where: str = "") -> bytes:
        if self._index is None:
            self._index = self._build()
        if digest not in self._index:
            raise DataError(f"{where}: pooled image {digest} is not in the pool shards")
        path, offset, size = self._index[digest]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def resolve_shards(
    path_or_paths: PathLike | Iterable[PathLike], *, datasets: Iterable[str] | None = None
) -> tuple[list[Path], ImagePool | None]:
    """The data shards (and image pool) named by a prepared directory, a manifest file, shard
    paths, or a list of those; `datasets` keeps only those datasets (directories only)."""
    items = (
        [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    )
    wanted = set(datasets) if datasets is not None else None
    shards: list[Path] = []
    pool_paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() or p.name == MANIFEST_NAME:
            root = p if p.is_dir() else p.parent
            doc = read_manifest(root)
            for entry in doc["shards"]:
                if entry.get("pool"):
                    pool_paths.append(root / entry["path"])
                elif wanted is None or entry["dataset"] in wanted:
                    shards.append(root / entry["path"])
        elif p.is_file():
            shards.append(p)
        else:
            raise DataError(f"{p}: no such shard file or prepared directory.")
    return shards, (ImagePool(pool_paths) if pool_paths else None)


def iter_samples(
    path_or_paths: PathLike | Iterable[PathLike],
    *,
    datasets: Iterable[str] | None = None,
    verify: bool = False,
) -> Iterator[Sample]:
    """Every sample of a prepared directory (in manifest order) or of the given shard files.

    Images come back as the stored bytes. `verify=True` first checks each directory's shard
    checksums against its manifest. A damaged shard or sample raises `DataError` naming it (this
    is the exact reader for evaluation and mining; the training stream skips and counts instead).
    """
    if verify:
        items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else path_or_paths
        for item in items:
            if Path(item).is_dir():
                problems = verify_checksums(item)
                if problems:
                    raise DataError(
                        f"{item}: {len(problems)} shard(s) do not match the manifest: "
                        + "; ".join(problems[:5])
                        + ". Re-run `mmemb prepare`."
                    )
    shards, pool = resolve_shards(path_or_paths, datasets=datasets)
    try:
        for shard in shards:
            for key, members in iter_shard_members(shard):
                yield decode_sample(key, members, where=str(shard), pool=pool)
    finally:
        if pool is not None:
            pool.close()

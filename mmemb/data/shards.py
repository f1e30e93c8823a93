"""WebDataset tar shards of `Sample`s: the writer, the manifest, and plain sequential reading.

On disk (one prepared directory)::

    out/
      manifest.json              schema version, counts per dataset, shards (samples, bytes,
                                 sha256),
                                 read/written/rejected, the command and mmemb version that made it
      rejects.jsonl              one line per rejected input row (when any were rejected)
      {dataset}-000000.tar       the samples of one dataset; a shard never mixes datasets, so a
      {dataset}-000001.tar       reader can mix datasets with weights and batch one task at a time
      pool-000000.tar            (eval sets only) each distinct candidate image once, by sha1

Inside a shard each sample is a group of members sharing a key (WebDataset's convention: the key
is the name up to the first dot)::

    000000042.json               {"id", "dataset", "meta", "query", "pos", "negs": [...]}
    000000042.q.jpg              query image (original bytes; .png for PNG bytes)
    000000042.pos.png            positive image
    000000042.neg0.jpg, .neg1.jpg, ...   hard-negative images

An item in the json is ``{"text": str|null, "instruction": str|null, "image": "q.jpg"|null}``
where ``image`` names the member holding its bytes; eval sets with large shared candidate lists
store ``"image_pool": "<sha1>"`` instead and keep the bytes once in ``pool-*.tar``.

Shards are plain ustar/pax tar files with fixed metadata (mtime 0, uid 0, mode 0444), so the same
samples always give byte-identical shards and checksums; `webdataset.WebDataset` reads them too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mmemb import __version__
from mmemb.data.images import image_ext
from mmemb.data.schema import SCHEMA_VERSION, Item, Sample
from mmemb.errors import DataError

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT = "mmemb-shards"
POOL_PREFIX = "pool"

# WebDataset's split of a member name into key and extension: the key ends at the first dot of
# the last path component.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]+")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# helpers


def safe_name(name: str) -> str:
    """A file-name-safe form of a dataset name ('MSCOCO/i2t' -> 'MSCOCO_i2t')."""
    safe = _SAFE_RE.sub("_", name).strip("._") or "dataset"
    return safe


def split_key(name: str) -> tuple[str, str] | None:
    """('000001', 'q.jpg') for '000001.q.jpg'; None for a member without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------
# encoding a sample as tar members


def _item_json(item: Item, image_ref: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"text": item.text, "instruction": item.instruction}
    out.update(image_ref if item.image is not None else {"image": None})
    return out


def encode_sample(
    sample: Sample, *, pool: dict[str, bytes] | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The sample's json bytes and its image members ``[(ext, bytes)]``.

    With `pool` (a dict to fill), images are referenced by sha1 and put into `pool` instead of
    being returned as members.
    """
    members: list[tuple[str, bytes]] = []

    def ref(item: Item, role: str) -> dict[str, str]:
        if item.image is None:
            return {}
        if pool is not None:
            digest = hashlib.sha1(item.image).hexdigest()
            pool.setdefault(digest, item.image)
            return {"image_pool": digest}
        ext = f"{role}.{image_ext(item.image)}"
        members.append((ext, item.image))
        return {"image": ext}

    doc = {
        "id": sample.id,
        "dataset": sample.dataset,
        "query": _item_json(sample.query, ref(sample.query, "q")),
        "pos": _item_json(sample.pos, ref(sample.pos, "pos")),
        "negs": [_item_json(n, ref(n, f"neg{i}")) for i, n in enumerate(sample.negs)],
        "meta": sample.meta,
    }
    try:
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"sample {sample.id!r} ({sample.dataset}): its meta is not JSON-serialisable ({exc}). "
            "Sources must put only str/int/float/bool/None/list/dict values in `meta`."
        ) from exc
    return data, members


def _decode_item(d: Any, members: Mapping[str, bytes], pool: ImagePool | None, where: str) -> Item:
    if not isinstance(d, dict):
        raise DataError(f"{where}: an item must be a JSON object, got {type(d).__name__}")
    image: bytes | None = None
    if d.get("image") is not None:
        name = d["image"]
        if name not in members:
            raise DataError(f"{where}: the json names image member '{name}' but the shard has none")
        image = members[name]
    elif d.get("image_pool") is not None:
        if pool is None:
            raise DataError(
                f"{where}: the item references pooled image {d['image_pool']} but no pool shards "
                "were given. Read the prepared directory (with its manifest.json), not single "
                "shards."
            )
        image = pool.get(d["image_pool"], where=where)
    try:
        return Item(text=d.get("text"), image=image, instruction=d.get("instruction"))
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


def decode_sample(
    key: str, members: Mapping[str, bytes], *, where: str, pool: ImagePool | None = None
) -> Sample:
    """Rebuild a `Sample` from the members of one key (``{'json': ..., 'q.jpg': ...}``)."""
    if "json" not in members:
        raise DataError(
            f"{where}: sample '{key}' has no '{key}.json' member (got {sorted(members)})"
        )
    try:
        doc = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: sample '{key}': its json does not parse ({exc})") from exc
    try:
        return Sample(
            id=str(doc["id"]),
            dataset=str(doc["dataset"]),
            query=_decode_item(doc["query"], members, pool, f"{where} sample '{key}' query"),
            pos=_decode_item(doc["pos"], members, pool, f"{where} sample '{key}' pos"),
            negs=[
                _decode_item(n, members, pool, f"{where} sample '{key}' neg{i}")
                for i, n in enumerate(doc.get("negs") or [])
            ],
            meta=dict(doc.get("meta") or {}),
        )
    except KeyError as exc:
        raise DataError(f"{where}: sample '{key}': its json lacks the field {exc}") from exc


# --------------------------------------------------------------------------------------------
# writing


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


# --------------------------------------------------------------------------------------------
# manifests


def read_manifest(directory: PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory (or of the manifest file itself), checked for format
    and schema version."""
    path = Path(directory)
    if path.name != MANIFEST_NAME or path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        where = path.parent
        hint = (
            f" A '{where.name}.partial' directory next to it means a prepare was interrupted."
            if where.with_name(f"{where.name}.partial").exists()
            else ""
        )
        raise DataError(
            f"{where}: no {MANIFEST_NAME}: not a prepared shard directory (or an unfinished one)."
            f"{hint} Run `mmemb prepare --out {where} ...` to make it."
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: cannot read the manifest ({exc}). Re-run `mmemb prepare`."
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path}: not an mmemb shard manifest (format is not '{FORMAT}').")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: shards use schema version {version}, this mmemb (v{__version__}) reads "
            f"version {SCHEMA_VERSION}. Re-run `mmemb prepare` with this version."
        )
    return doc


def verify_checksums(directory: PathLike) -> list[str]:
    """Problems found comparing each shard's size and sha256 with the manifest (none: all good)."""
    root = Path(directory)
    doc = read_manifest(root)
    problems = []
    for entry in doc["shards"]:
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest} != manifest {entry['sha256']}")
    return problems


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class SampleLoc:
    """Where one sample's members are in a shard: ext -> (byte offset of the data, size)."""

    key: str
    members: tuple[tuple[str, int, int], ...]


class _NeedsTarfile(Exception):
    """The fast header scan met a pax/GNU extension header: let `tarfile` parse the shard."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _scan_headers(path: PathLike) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of each regular file, from plain ustar headers only.

    About ten times faster than `tarfile` (no TarInfo objects, no pax machinery); raises
    `_NeedsTarfile` for extension headers and `tarfile.ReadError` for damage.
    """
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 512 <= end:
            f.seek(offset)
            header = f.read(512)
            if header.count(0) == 512:  # end-of-archive marker
                return
            stored = _octal(header[148:156])
            if stored != sum(header[:148]) + 256 + sum(header[156:]):
                raise tarfile.ReadError(f"bad header checksum at byte {offset}")
            kind = header[156:157]
            if kind in (b"x", b"g", b"L", b"K"):
                raise _NeedsTarfile
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                if prefix:
                    name = f"{prefix}/{name}"
            size = _octal(header[124:136])
            data = offset + 512
            if data + size > end:
                raise tarfile.ReadError(f"member {name} is truncated (unexpected end of data)")
            if kind in (b"0", b"\0", b"7"):
                yield name, data, size
            offset = data + (size + 511) // 512 * 512
        # No end-of-archive marker: the file was cut short (its last sample may lack members).
        raise tarfile.ReadError("unexpected end of data (the shard is truncated)")


def _scan_tarfile(path: PathLike) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(path, mode="r:") as tar:
        while True:
            info = tar.next()
            if info is None:
                return
            tar.members.clear()  # type: ignore[attr-defined]  # else tarfile keeps every header
            if info.isfile():
                yield info.name, info.offset_data, info.size


def scan_shard(path: PathLike) -> tuple[list[SampleLoc], str | None]:
    """Index a shard by reading only tar headers (data is skipped with seeks).

    Returns the samples in order and, for a damaged shard, an error message (the samples before
    the damage are still returned: a truncated shard loses only its tail).
    """
    try:
        return _group(_scan_headers(path), path)
    except _NeedsTarfile:
        return _group(_scan_tarfile(path), path)


def _group(
    members: Iterator[tuple[str, int, int]], path: PathLike
) -> tuple[list[SampleLoc], str | None]:
    locs: list[SampleLoc] = []
    error: str | None = None
    cur_key: str | None = None
    cur: list[tuple[str, int, int]] = []
    try:
        for name, offset, size in members:
            parts = split_key(name)
            if parts is None:
                continue
            key, ext = parts
            if key != cur_key:
                if cur_key is not None:
                    locs.append(SampleLoc(cur_key, tuple(cur)))
                cur_key, cur = key, []
            cur.append((ext, offset, size))
    except (OSError, UnicodeDecodeError, ValueError, tarfile.TarError, EOFError) as exc:
        error = f"{path}: {type(exc).__name__}: {exc}"
        cur_key = None  # the last group may be incomplete
    if cur_key is not None:
        locs.append(SampleLoc(cur_key, tuple(cur)))
    return locs, error


def read_members(f: IO[bytes], loc: SampleLoc, *, path: PathLike = "?") -> dict[str, bytes]:
    """The data of one located sample, read with seeks from an open shard file."""
    out = {}
    for ext, offset, size in loc.members:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"{path}: sample '{loc.key}' member '{ext}' is truncated")
        out[ext] = data
    return out


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

"""`prepare`: read a source, check every row, write shards + manifest atomically.

Every row read ends up either written or rejected (``read = written + rejected``, checked at the
end). The checks here apply to every source alike:

- image bytes must decode fully (truncated/corrupt -> 'corrupt_image'); images that are not JPEG
  or PNG are converted to PNG; with `max_image_side` larger images are downscaled;
- a text that is empty or whitespace with no image beside it -> 'empty_text' (with an image, the
  empty text is dropped and the image kept);
- a sample id seen before in this output -> 'duplicate_id'.

The output is written into ``{out}.partial`` and renamed to `out` only when complete, so an
interrupted prepare never leaves a directory with a manifest that looks finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal

from mmemb import plugins
from mmemb.data.images import ImageError, normalize_image
from mmemb.data.schema import Item, Sample
from mmemb.data.shards import MANIFEST_NAME, REJECTS_NAME, ShardWriter, write_json_atomic
from mmemb.data.sources import Reject, Source
from mmemb.errors import DataError

ProgressFn = Callable[[int, int, int], None]
"""Called as ``progress(read, written, rejected)`` after every row."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}


@dataclass
class PrepareReport:
    """What a prepare did: rows read, written, rejected by reason, and where the output is."""

    source: str
    out: Path
    manifest_path: Path
    read: int
    written: int
    rejected: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    seconds: float = 0.0
    rejects_path: Path | None = None

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items()))
        line = f"read {self.read} = written {self.written} + rejected {self.total_rejected}"
        if reasons:
            line += f" ({reasons}; see {self.rejects_path})"
        n_ds = len(self.datasets)
        line += (
            f" -> {self.out} ({self.shards} shards, {n_ds} dataset{'s' * (n_ds != 1)}, "
            f"{self.seconds:.1f}s)"
        )
        return line


def parse_shard_size(value: int | str) -> tuple[int | None, int | None]:
    """(max samples, max bytes) from ``1000`` (samples) or ``'500MB'`` / ``'1GiB'`` (bytes)."""
    if isinstance(value, int):
        if value < 1:
            raise DataError(f"shard size must be at least 1 sample (got {value}).")
        return value, None
    text = str(value).strip().upper().replace(" ", "")
    digits = text.rstrip("KMGIB")
    unit = text[len(digits) :]
    try:
        number = float(digits)
    except ValueError:
        number = -1
    if number <= 0 or unit not in _UNITS:
        raise DataError(
            f"shard size {value!r} is not understood: give a number of samples (1000) or a size "
            "with a unit (500MB, 1GB, 256MiB)."
        )
    if unit == "":
        return int(number), None
    return None, int(number * _UNITS[unit])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _where(sample: Sample, source_name: str) -> tuple[str, int | None]:
    o = sample.meta.get("origin")
    if isinstance(o, dict) and "file" in o:
        line = o.get("line")
        return str(o["file"]), line if isinstance(line, int) else None
    return f"source {source_name}", None


def _check_item(item: Item, role: str, sample: Sample, source_name: str,
                max_image_side: int | None) -> Item | Reject:
    file, line = _where(sample, source_name)
    text = item.text
    if text is not None and not isinstance(text, str):
        return Reject(
            "missing_field", file, line, f"{role} text is {type(text).__name__}, not a string",
            sample.id,
        )
    if text is not None and not text.strip():
        if item.image is None:
            return Reject(
                "empty_text", file, line, f"{role} text is empty ({text!r}) and there is no image",
                sample.id,
            )
        text = None
    image = item.image
    if image is not None:
        try:
            image = normalize_image(image, max_side=max_image_side)
        except ImageError as exc:
            return Reject("corrupt_image", file, line, f"{role} image: {exc}", sample.id)
    instruction = item.instruction if item.instruction and item.instruction.strip() else None
    if text is item.text and image is item.image and instruction is item.instruction:
        return item
    return Item(text=text, image=image, instruction=instruction)


def check_items(record: Sample | Reject, source_name: str,
                max_image_side: int | None) -> Sample | Reject:
    """The per-sample checks that need no other sample (the costly part: decoding every image);
    a `Reject` passes through. Pure, so it runs in worker processes."""
    if isinstance(record, Reject):
        return record
    sample = record
    file, line = _where(sample, source_name)
    if not isinstance(sample.id, str) or not sample.id:
        return Reject("missing_field", file, line, "the sample has no id")
    if not isinstance(sample.dataset, str) or not sample.dataset:
        return Reject("missing_field", file, line, "the sample has no dataset name", sample.id)
    items: list[Item] = []
    roles = ["query", "pos", *(f"neg{i}" for i in range(len(sample.negs)))]
    for role, item in zip(roles, [sample.query, sample.pos, *sample.negs], strict=True):
        checked = _check_item(item, role, sample, source_name, max_image_side)
        if isinstance(checked, Reject):
            return checked
        items.append(checked)
    return dataclasses.replace(sample, query=items[0], pos=items[1], negs=items[2:])


def _check_chunk(records: list[Sample | Reject], source_name: str,
                 max_image_side: int | None) -> list[Sample | Reject]:
    return [check_items(r, source_name, max_image_side) for r in records]


CHUNK = 16
"""Samples per task sent to a worker process."""


def checked_records(
    records: Iterable[Sample | Reject], *, source_name: str, max_image_side: int | None,
    workers: int,
) -> Generator[Sample | Reject, None, None]:
    """`check_items` over `records`, in their order; with ``workers > 1`` in that many processes.

    At most ``2 * workers`` chunks are in flight, so a large source is never read far ahead of
    what has been written (a pool's `imap` would read it all into its task queue)."""
    if workers <= 1:
        for record in records:
            yield check_items(record, source_name, max_image_side)
        return
    import multiprocessing

    # spawn, not fork: the parent may hold threads (a source's readers, torch's pools).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque[Any] = deque()
        it = iter(records)
        while chunk := list(islice(it, CHUNK)):
            pending.append(pool.apply_async(_check_chunk,
                                            (chunk, source_name, max_image_side)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class _UniqueIds:
    """Refuses a sample id seen before in this output (in reading order)."""

    def __init__(self) -> None:
        # 8-byte digests instead of the ids themselves: millions of ids stay in tens of MB.
        self.seen: set[bytes] = set()

    def check(self, sample: Sample, source_name: str) -> Sample | Reject:
        digest = hashlib.blake2b(sample.id.encode(), digest_size=8).digest()
        if digest in self.seen:
            file, line = _where(sample, source_name)
            return Reject(
                "duplicate_id", file, line, f"id {sample.id!r} was already written", sample.id
            )
        self.seen.add(digest)
        return sample


def _check_out(out: Path, staging: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out} is a file; give a directory path.")
        if any(out.iterdir()):
            if not (out / MANIFEST_NAME).is_file():
                raise DataError(
                    f"--out {out} is a non-empty directory that is not a prepared shard directory "
                    "(no manifest.json); refusing to write into it or replace it, even with "
                    "--overwrite. Choose another --out or empty it yourself."
                )
            if not overwrite:
                raise DataError(
                    f"--out {out} already holds prepared shards. Pass --overwrite to replace "
                    "them, or choose another --out."
                )
    if staging.exists():
        if not overwrite:
            raise DataError(
                f"{staging} exists: an earlier prepare into {out} was interrupted (or one is "
                "running now). Remove it, or pass --overwrite."
            )
        shutil.rmtree(staging)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing an old output if there is one."""
    old: Path | None = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    source: str,
    source_args: Mapping[str, Any],
    out: str | Path,
    *,
    dataset_name: str | None = None,
    limit: int | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    overwrite: bool = False,
    shard_size: int | str = 1000,
    max_image_side: int | None = None,
    command: str | None = None,
    progress: ProgressFn | None = None,
    workers: int = 1,
) -> PrepareReport:
    """Read source `source` (built with `source_args`) and write shards + manifest into `out`.

    - `dataset_name` replaces the dataset name of every sample (sources default to one from the
      input, e.g. the file name).
    - `limit` reads at most that many rows (so ``read = written + rejected`` still holds).
    - `on_error='fail'` stops at the first bad row with a `DataError` naming file, line and
      reason; 'skip' counts it by reason and appends it to ``rejects.jsonl``.
    - `shard_size`: samples per shard (int) or a byte size like '500MB' (see `parse_shard_size`).
    - `max_image_side`: downscale images whose longer side is larger (else bytes are kept as-is).
    - `command`: recorded in the manifest (the CLI passes its command line).
    - `workers`: processes that decode and check the images (the costly part); the output is the
      same for any number.
    """
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip' (got {on_error!r}).")
    if workers < 1:
        raise DataError(f"workers must be at least 1 (got {workers}).")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows (got {limit}).")
    if max_image_side is not None and max_image_side < 1:
        raise DataError(
            f"max_image_side must be a positive number of pixels (got {max_image_side})."
        )
    max_samples, max_bytes = parse_shard_size(shard_size)
    out = Path(out).expanduser()
    staging = out.with_name(f"{out.name}.partial")
    args = dict(source_args)
    src: Source = plugins.build("source", source, _where=f"source '{source}'", **args)
    _check_out(out, staging, overwrite)

    started = time.perf_counter()
    unique = _UniqueIds()
    read = 0
    rejected: dict[str, int] = {}
    rejects_file: IO[str] | None = None
    writer = ShardWriter(
        staging,
        max_samples=max_samples,
        max_bytes=max_bytes or (1 << 30),
        pool_images=getattr(src, "pool_images", False),
    )

    def records() -> Iterator[Sample | Reject]:
        for record in islice(src, limit):  # islice(…, None) reads everything
            if isinstance(record, Sample):
                if dataset_name is not None:
                    record = dataclasses.replace(record, dataset=dataset_name)
            elif not isinstance(record, Reject):
                raise TypeError(
                    f"source '{source}' yielded {type(record).__name__}; a source yields Sample "
                    "or Reject (mmemb.data.sources)"
                )
            yield record

    checked_stream = checked_records(records(), source_name=source,
                                     max_image_side=max_image_side, workers=workers)
    try:
        for checked in checked_stream:
            read += 1
            if isinstance(checked, Sample):
                checked = unique.check(checked, source)
            if isinstance(checked, Reject):
                if on_error == "fail":
                    ident = f" (sample {checked.id!r})" if checked.id else ""
                    raise DataError(
                        f"{checked.where}: {checked.reason}{ident}: {checked.detail}. Fix the "
                        "input, or run with --on-error skip to write such rows to "
                        f"{REJECTS_NAME} and go on."
                    )
                rejected[checked.reason] = rejected.get(checked.reason, 0) + 1
                if rejects_file is None:
                    rejects_file = open(staging / REJECTS_NAME, "w", encoding="utf-8")  # noqa: SIM115
                rejects_file.write(json.dumps(checked.to_json(), ensure_ascii=False) + "\n")
            else:
                writer.write(checked)
            if progress is not None:
                progress(read, writer.written, sum(rejected.values()))
        shards = writer.close()
        if rejects_file is not None:
            rejects_file.close()
        written = writer.written
        n_rejected = sum(rejected.values())
        if read != written + n_rejected:  # the promise users rely on; a bug if it breaks
            raise RuntimeError(
                f"prepare lost rows: read {read} != written {written} + rejected {n_rejected}"
            )
        seconds = time.perf_counter() - started
        manifest = writer.manifest(
            kind=getattr(src, "kind", "train"),
            source={"name": source, "args": _jsonable(args)},
            dataset_name=dataset_name,
            limit=limit,
            on_error=on_error,
            shard_size=shard_size,
            max_image_side=max_image_side,
            read=read,
            written=written,
            rejected=dict(sorted(rejected.items())),
            command=command
            or (f"mmemb.data.prepare.prepare({source!r}, {_jsonable(args)!r}, {str(out)!r})"),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            seconds=round(seconds, 3),
        )
        write_json_atomic(staging / MANIFEST_NAME, manifest)
        _publish(staging, out)
    except BaseException:
        checked_stream.close()  # stops the worker processes
        writer.abort()
        if rejects_file is not None:
            rejects_file.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PrepareReport(
        source=source,
        out=out,
        manifest_path=out / MANIFEST_NAME,
        read=read,
        written=written,
        rejected=dict(sorted(rejected.items())),
        datasets={name: d["samples"] for name, d in manifest["datasets"].items()},
        shards=sum(1 for s in shards if not s.get("pool")),
        seconds=seconds,
        rejects_path=(out / REJECTS_NAME) if rejected else None,
    )

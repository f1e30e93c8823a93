"""`prepare`: read a source, check every row, write shards + manifest atomically.

Every row read ends up either written or rejected (``read = written + rejected``, checked at the
end). The checks here apply to every source alike:

- image bytes must decode fully (truncated/corrupt -> 'corrupt_image'); images that are not JPEG
  or PNG are converted to PNG; with `max_image_side` larger images are downscaled;
- a text that is empty or whitespace with no image beside it -> 'empty_text' (with an image, the
  empty text is dropped and the image kept);
- a sample id seen before in this output -> 'duplicate_id'.

The output is written into ``{out}.partial`` and renamed to `out` only when complete, so an
interrupted prepare never leaves a directory with a manifest that looks finished. The staging
directory is locked (`flock`) by the process writing it for as long as it runs: a rerun removes a
staging directory whose writer is gone (killed, even by SIGKILL), and refuses one whose writer is
still running.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Literal

from mmemb import plugins
from mmemb.data.images import ImageError, normalize_image
from mmemb.data.schema import Item, Sample
from mmemb.data.shards import MANIFEST_NAME, REJECTS_NAME, ShardWriter, write_json_atomic
from mmemb.data.sources import Reject, Source
from mmemb.data.target_order import TargetOrder
from mmemb.errors import DataError
from mmemb.fileio import replace_dir

if TYPE_CHECKING:
    from mmemb.recipe import DataEntry, LoadedRecipe

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
    notes: list[str] = field(default_factory=list)
    """Things done on the way worth telling, e.g. a stale staging directory that was removed."""

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def __str__(self) -> str:
        """The notes, one a line, then the summary line (last, so it is the result)."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items()))
        line = f"read {self.read} = written {self.written} + rejected {self.total_rejected}"
        if reasons:
            line += f" ({reasons}; see {self.rejects_path})"
        n_ds = len(self.datasets)
        line += (
            f" -> {self.out} ({self.shards} shards, {n_ds} dataset{'s' * (n_ds != 1)}, "
            f"{self.seconds:.1f}s)"
        )
        return "\n".join([*self.notes, line])


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


def _check_out(out: Path, overwrite: bool) -> None:
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


OWNER_NAME = ".prepare-owner.json"
"""In a staging directory: who is writing it (pid, host, start), for messages."""


def _owner(staging: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((staging / OWNER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_text(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "no owner record"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def _lock(fd: int) -> bool | None:
    """Take the exclusive lock without waiting: True if taken, False if another process holds
    it, None if the file system has no locks (some network file systems without flock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _writer_gone(owner: dict[str, Any] | None) -> bool | None:
    """Without locks: whether the recorded writer has ended (None: cannot tell from here)."""
    if owner is None or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return None
    return False


def _remove_if_stale(staging: Path, out: Path) -> str | None:
    """Remove `staging` if the process that wrote it has ended; a note saying so, or None if it
    was already gone. Raises `DataError` while another prepare is writing it."""
    if staging.exists() and not staging.is_dir():
        raise DataError(
            f"{staging} is a file, where prepare stages {out}. Remove it or choose another --out."
        )
    try:
        fd = os.open(staging, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        owner = _owner(staging)
        locked = _lock(fd)
        # A lock dies with its process, whatever killed it: a free lock means the writer is gone.
        gone = locked if locked is not None else _writer_gone(owner)
        if gone is None:
            raise DataError(
                f"{staging} exists ({_owner_text(owner)}) and this file system has no locks to "
                f"tell whether that prepare into {out} is still running. If it is not, remove "
                f"{staging} and run this again."
            )
        if not gone:
            raise DataError(
                f"{staging}: another prepare into {out} is running now ({_owner_text(owner)}). "
                "Wait for it to finish, or stop it; once it has stopped, rerunning this command "
                "cleans up after it."
            )
        shutil.rmtree(staging)
        return f"removed {staging}, left by an interrupted prepare ({_owner_text(owner)})"
    finally:
        os.close(fd)


def _claim_staging(staging: Path, out: Path) -> tuple[int, list[str]]:
    """Create `staging`, locked by this process: (the open descriptor holding the lock, notes).

    The directory is made under a private name, locked, and renamed into place, so no other
    process ever sees it unlocked; a rename onto an existing (non-empty) staging directory fails,
    and that one is removed if its writer is gone, or refused if it is alive."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging.with_name(f".{staging.name}.claim-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    fd: int | None = None
    notes: list[str] = []
    try:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": now}
        (tmp / OWNER_NAME).write_text(json.dumps(owner))  # non-empty: a rename cannot replace it
        fd = os.open(tmp, os.O_RDONLY)
        _lock(fd)  # None (no locks here): others judge by the owner record instead
        for _ in range(5):
            try:
                os.rename(tmp, staging)
                return fd, notes
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
            note = _remove_if_stale(staging, out)
            if note is not None:
                notes.append(note)
        raise DataError(
            f"{staging} keeps reappearing: another prepare into {out} is starting at the same "
            "time. Run one at a time."
        )
    except BaseException:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _release_staging(fd: int, staging: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(staging, ignore_errors=True)
    os.close(fd)


class PrepareInterrupted(BaseException):  # noqa: N818 - a requested stop, not an error
    """Raised inside `prepare` when SIGTERM/SIGUSR1 arrives under `stop_on_signals` (a
    BaseException, like KeyboardInterrupt, so no `except Exception` in a source swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What schedulers (SLURM, Kubernetes) send before killing a job, and Ctrl-C."""

_deferring = 0
_pending: int | None = None


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise PrepareInterrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGUSR1 into `PrepareInterrupted` (and SIGINT into KeyboardInterrupt) while
    the block runs, so `prepare` removes its staging directory and the caller can exit with a
    requeue status -- except while prepare moves the finished output into place: a stop then
    is not raised at all, as the prepare has finished (it returns, with a note saying so). Main
    thread only (a no-op elsewhere); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        global _pending
        if _deferring:
            _pending = signum
            return
        _raise_for(signum)

    old = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def _stops_held() -> Iterator[list[int]]:
    """Record, rather than raise, a stop requested inside the block; the list it yields holds the
    signal once the block has ended. The block is the move of a finished output into place: a
    stop between its two renames would leave neither output, and a stop after it would report a
    written output as lost (exit 75), so that a requeued plain prepare refuses the output it
    just made."""
    global _deferring, _pending
    held: list[int] = []
    _deferring += 1
    try:
        yield held
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            held.append(_pending)
            _pending = None


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing an old output if there is one.

    Only the final swap is the shared `replace_dir`; the staging directory itself is not a plain
    temporary name: it is claimed under a lock (`_claim_staging`), because a concurrent or
    killed prepare into the same `out` must be told apart from a live one."""
    replace_dir(staging, out, old=out.with_name(f".{out.name}.old-{os.getpid()}"))


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
    _check_out(out, overwrite)  # fail fast, before touching anything
    lock_fd, notes = _claim_staging(staging, out)
    try:
        _check_out(out, overwrite)  # again under the lock: a prepare that just finished counts
        writer = ShardWriter(
            staging,
            max_samples=max_samples,
            max_bytes=max_bytes or (1 << 30),
            pool_images=getattr(src, "pool_images", False),
        )
    except BaseException:
        _release_staging(lock_fd, staging, remove=True)
        raise

    started = time.perf_counter()
    unique = _UniqueIds()
    order = TargetOrder() if getattr(src, "kind", "train") == "train" else None
    read = 0
    rejected: dict[str, int] = {}
    rejects_file: IO[str] | None = None

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
                if order is not None:
                    order.add(checked)
            if progress is not None:
                progress(read, writer.written, sum(rejected.values()))
        shards = writer.close()
        if rejects_file is not None:
            rejects_file.close()
        grouped = order.note() if order is not None else None
        if grouped is not None:
            notes.append(grouped)
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
        (staging / OWNER_NAME).unlink()
        with _stops_held() as held_stops:
            _publish(staging, out)
        if held_stops:  # the work is done and in place: finish normally, say why no stop
            notes.append(
                f"{signal.Signals(held_stops[0]).name} arrived while the finished output was "
                f"moved into {out}; the prepare had completed, so it was not stopped"
            )
    except BaseException:
        checked_stream.close()  # stops the worker processes
        writer.abort()
        if rejects_file is not None:
            rejects_file.close()
        _release_staging(lock_fd, staging, remove=True)
        raise
    _release_staging(lock_fd, staging, remove=False)
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
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# a recipe's datasets


def is_prepared(shards: str | Path) -> bool:
    """Whether `shards` holds a finished prepare (its manifest is written last, on publishing)."""
    return (Path(shards) / MANIFEST_NAME).is_file()


def prepare_recipe_data(
    loaded: LoadedRecipe,
    *,
    command: str,
    overwrite: bool = False,
    on_error: Literal["fail", "skip"] = "fail",
    workers: int = 1,
    missing_source: Literal["error", "skip"] = "error",
    echo: Callable[[str], None] = print,
    around: Callable[[DataEntry, Path], AbstractContextManager[ProgressFn | None]] | None = None,
) -> list[PrepareReport]:
    """Prepare the recipe's datasets (train, then eval) that are not prepared yet -- every one
    that has a `source:` when `overwrite` -- and return their reports. The one loop behind
    `mmemb train` (missing data is prepared first), `mmemb prepare --recipe` and, through
    `train`, `mmemb validate`.

    - `missing_source`: a dataset whose shards are missing and that names no `source:` is an
      error (``"error"``: training needs it) or left alone (``"skip"``: `prepare --recipe` makes
      what it can; it is an error only when no dataset names a source at all).
    - `around(entry, out)`: a context entered around each dataset's prepare; what it yields is
      passed as `prepare`'s `progress`.
    """
    entries = [*loaded.recipe.data.train, *loaded.recipe.data.eval]
    if missing_source == "skip":
        entries = [e for e in entries if e.source is not None]
        if not entries:
            raise DataError(f"{loaded.path}: no data entry names a `source:` to prepare.")
    reports = []
    for entry in entries:
        out = Path(loaded.resolve_path(entry.shards))
        if is_prepared(out) and not overwrite:
            if missing_source == "skip":
                echo(f"{out}: already prepared (use --overwrite to redo)")
            continue
        if entry.source is None:
            raise DataError(
                f"{loaded.path}: data shards {entry.shards!r} do not exist and no `source:` "
                "says how to make them. Run `mmemb prepare` first."
            )
        echo(f"preparing {out} from source '{entry.source}'")
        with around(entry, out) if around is not None else nullcontext() as progress:
            report = prepare(
                entry.source, entry.args, out, limit=entry.limit, overwrite=overwrite,
                on_error=on_error, command=command, progress=progress, workers=workers,
            )
        echo(str(report))
        reports.append(report)
    return reports

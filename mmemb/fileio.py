"""Write then rename: files and directories that appear only when complete.

Every output a reader (or a rerun) may find -- a manifest, a results file, a run record, embeddings,
a checkpoint, a model directory, prepared or mined shards -- is written under a temporary name
beside its final path and renamed into place, so it is either absent, the old one, or whole:

- `atomic_write_text` / `atomic_write_bytes` / `atomic_write_json`: a small file in one call;
- `atomic_path`: a file written by a streaming writer (yields the temporary path to write);
- `replace_dir`: publish a finished staging directory, swapping out an old one without a moment
  when neither exists (the old one is renamed aside first and removed after);
- `remove_dir`: delete a directory by renaming it aside first, so a deletion cut short never
  leaves a half-deleted directory under the final name.

Temporary names start with '.' and carry the process id, so two writers never share one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside `path` for writing it: ``.{name}.{pid}.{tag}``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{tag}")


@contextmanager
def atomic_path(path: Path, *, tag: str = "tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block ends normally,
    remove it when the block raises (the error propagates; an old `path` stays untouched)."""
    tmp = temp_sibling(path, tag)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a
    file. With `fsync`, the data reaches the disk before the rename publishes it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON (non-ASCII kept) plus a newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(staging: Path, final: Path, *, old: Path | None = None) -> None:
    """Move the finished directory `staging` to `final`. An existing `final` is first renamed to
    `old` (default: a hidden name beside it) and removed once `staging` is in place. Between the
    two renames `final` does not exist: a crash there leaves the old one under `old`, complete,
    for the caller to restore (checkpoints do; see `mmemb.train.checkpoint.save_checkpoint`)."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = old if old is not None else temp_sibling(final, "old")
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path, *, trash: Path | None = None) -> None:
    """Delete the directory `path`: renamed out of the way first (atomic, default a hidden name
    beside it), then removed, so a deletion cut short leaves no partial `path` behind."""
    trash = trash if trash is not None else temp_sibling(path, "trash")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)

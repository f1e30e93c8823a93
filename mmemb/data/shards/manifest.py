"""The manifest of a prepared shard directory: its names, reading and checking it, and the
atomic JSON write and file checksum the writer records it with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mmemb import __version__
from mmemb.data.schema import SCHEMA_VERSION
from mmemb.errors import DataError
from mmemb.fileio import atomic_write_json

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT = "mmemb-shards"
POOL_PREFIX = "pool"

PathLike = str | os.PathLike[str]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers never see half a file.
    (`mmemb.fileio.atomic_write_json`, under the name the shard code has always used.)"""
    atomic_write_json(path, obj)


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

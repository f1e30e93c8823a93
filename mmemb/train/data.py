"""The recipe's datasets: prepare the ones that are missing and have a source, locate them, and
check their shard files against the manifests (a truncated shard is an error, not a warning)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from mmemb.distributed import DistEnv, barrier
from mmemb.errors import DataError
from mmemb.recipe import DataEntry, LoadedRecipe

log = logging.getLogger(__name__)


def shard_dir(loaded: LoadedRecipe, entry: DataEntry) -> Path:
    """Where an entry's shards are: relative to the recipe file if they exist there, else cwd."""
    return Path(loaded.resolve_path(entry.shards))


def ensure_prepared(loaded: LoadedRecipe, env: DistEnv, *, echo: Callable[[str], None] = print
                    ) -> None:
    """Prepare every listed dataset that has a `source` and no shards yet (rank 0 only; a
    missing dataset without a source is an error), then wait for it on every rank."""
    from mmemb.data.prepare import prepare_recipe_data

    if env.is_main:
        prepare_recipe_data(loaded, command=f"mmemb train {loaded.path}", echo=echo)
    barrier()


def damaged_shards(loaded: LoadedRecipe) -> list[str]:
    """Training shards whose size on disk differs from the one manifest.json recorded (a copy or
    a disk cut short, a file replaced under a running job), as ``"PATH (N bytes on disk,
    manifest.json says M)"``. A ``stat`` per shard: cheap enough to run at every start and
    whenever the stream reports a shard or sample it could not read."""
    from mmemb.data.shards import read_manifest

    found = []
    for entry in loaded.recipe.data.train:
        root = shard_dir(loaded, entry)
        for shard in read_manifest(root).get("shards", []):
            expected = shard.get("bytes")
            if expected is None:
                continue
            path = root / shard["path"]
            try:
                size: int | None = os.stat(path).st_size
            except FileNotFoundError:
                size = None
            if size != expected:
                have = "missing" if size is None else f"{size} bytes on disk"
                found.append(f"{path} ({have}, manifest.json says {expected})")
    return found


def check_shards(loaded: LoadedRecipe, *, when: str, checkpoint: str | None) -> None:
    """Raise `DataError` naming every damaged training shard (see `damaged_shards`)."""
    damaged = damaged_shards(loaded)
    if not damaged:
        return
    kept = f"The last checkpoint is {checkpoint}; after" if checkpoint else "After"
    raise DataError(
        f"{when}: {len(damaged)} training shard(s) are damaged (truncated or replaced): "
        f"{'; '.join(damaged[:5])}{'; ...' if len(damaged) > 5 else ''}. Restore the files. {kept} "
        "that, rerun the same command with --resume auto (the data position is in the "
        "checkpoint); preparing the data anew instead means a new run (--overwrite)."
    )

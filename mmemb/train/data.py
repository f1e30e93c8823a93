"""The recipe's datasets: prepare the ones that are missing and have a source, then locate them."""

from __future__ import annotations

import logging
from pathlib import Path

from mmemb.distributed import DistEnv, barrier
from mmemb.errors import DataError
from mmemb.recipe import DataEntry, LoadedRecipe

log = logging.getLogger(__name__)


def shard_dir(loaded: LoadedRecipe, entry: DataEntry) -> Path:
    """Where an entry's shards are: relative to the recipe file if they exist there, else cwd."""
    return Path(loaded.resolve_path(entry.shards))


def ensure_prepared(loaded: LoadedRecipe, env: DistEnv, *, echo=print) -> None:
    """Prepare every listed dataset that has a `source` and no shards yet (rank 0 only)."""
    from mmemb.data.prepare import prepare

    entries = [*loaded.recipe.data.train, *loaded.recipe.data.eval]
    if env.is_main:
        for entry in entries:
            out = shard_dir(loaded, entry)
            if (out / "manifest.json").is_file():
                continue
            if entry.source is None:
                raise DataError(
                    f"{loaded.path}: data shards {entry.shards!r} do not exist and no `source:` "
                    "says how to make them. Run `mmemb prepare` first."
                )
            echo(f"preparing {out} from source '{entry.source}'")
            report = prepare(
                entry.source, entry.args, out, limit=entry.limit,
                command=f"mmemb train {loaded.path}",
            )
            echo(str(report))
    barrier()

"""`mmemb validate`: check a recipe completely before spending GPU hours on it.

Validation reports every problem of the recipe at once (keys, types, components and their
arguments, input paths); then every component is built, and one training step runs on a tiny
batch — with the real data when its shards exist, otherwise with a small sample prepared from the
recipe's source into a temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from mmemb import plugins
from mmemb.recipe import LoadedRecipe, load_recipe


def validate_recipe(
    path: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    *,
    echo: Callable[[str], None] = print,
) -> float:
    """Validate `path`; returns the loss of the one step it ran. Raises `MmembError` on problems."""
    loaded = load_recipe(path, overrides)
    r = loaded.recipe
    echo(f"recipe {path}: keys, types and component arguments are valid")
    plugins.build_from("eval_task", r.eval.task, where="eval.task")
    plugins.build_from("exporter", r.export.exporter, where="export.exporter")
    with tempfile.TemporaryDirectory(prefix="mmemb-validate-") as tmp:
        small = _small_copy(loaded, Path(tmp))
        from mmemb.train import train

        result = train(small, echo=echo, max_steps=1, save=False, evaluate=False)
    echo(f"one training step ran: loss {result.final_loss:.4f}. The recipe is valid.")
    return result.final_loss


def _small_copy(loaded: LoadedRecipe, tmp: Path) -> LoadedRecipe:
    """The recipe with outputs in `tmp` and missing datasets prepared there, a few samples each."""
    raw = dict(loaded.raw)
    data = dict(raw.get("data", {}))
    need = 2 * loaded.recipe.train.batch_size
    train_entries = []
    for i, entry in enumerate(loaded.recipe.data.train):
        e = entry.model_dump()
        if not (Path(loaded.resolve_path(entry.shards)) / "manifest.json").is_file():
            e["shards"] = str(tmp / f"train{i}")
            e["limit"] = need
        else:
            e["shards"] = loaded.resolve_path(entry.shards)
        train_entries.append(e)
    data["train"] = train_entries
    data["eval"] = []
    data["num_workers"] = 0
    raw["data"] = data
    raw["output_dir"] = str(tmp / "out")
    return LoadedRecipe(recipe=type(loaded.recipe).model_validate(raw), path=loaded.path,
                        overrides=loaded.overrides, raw=raw)


"""`mmemb validate`: check a recipe completely before spending GPU hours on it.

First every problem of the recipe is collected and reported at once, with a count: bad
overrides, unknown keys (with the closest valid key), bad values, unknown components and their
bad arguments, missing shard directories, missing source input files and image folders of the
datasets still to be prepared, and a backbone whose weights cannot be had (not a local directory,
not in the Hugging Face cache, and offline or the hub not answering -- found out in seconds, not
after network retries). Only a recipe without problems goes on: every component is built and one
training step runs on a tiny batch -- with the real data when its shards exist, otherwise with a
small sample prepared from the recipe's source into a temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mmemb import hub, plugins
from mmemb.data.prepare import is_prepared
from mmemb.errors import ConfigError
from mmemb.recipe import LoadedRecipe, RecipeCheck, check_recipe
from mmemb.threads import use_recipe_threads


def _looks_local(path: str) -> bool:
    # As the Hugging Face backbones read `path`: './x', '/x', '~/x' or 'a/b/c' is a directory,
    # 'org/name' (or 'name') a hub id.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def weight_problems(check: RecipeCheck) -> list[str]:
    """The backbone's `path` names nothing that can be loaded here: a missing local directory,
    or a hub id that is not cached while offline mode is on or the hub does not answer."""
    model = check.data.get("model")
    backbone = model.get("backbone") if isinstance(model, dict) else None
    path = backbone.get("path") if isinstance(backbone, dict) else None
    if not isinstance(path, str) or not path:
        return []
    resolved = check.resolve_path(path)
    if Path(resolved).expanduser().exists():
        return []
    where = check.where("model.backbone.path")
    if _looks_local(path):
        return [f"{where}: directory {path!r} does not exist (relative paths are read next to "
                "the recipe, then from the working directory). Point it at a model directory or "
                "a hub id; `python -m mmemb.testing.tiny llava_onevision DIR` builds a tiny one."]
    missing = hub.unavailable(path)
    return [f"{where}: {missing}."] if missing else []


def recipe_problems(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[RecipeCheck, list[str]]:
    """The recipe as checked, and every problem `validate` reports before building anything."""
    check = check_recipe(path, overrides, check_inputs=True)
    return check, [*check.problems, *weight_problems(check)]


def validate_recipe(
    path: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    *,
    echo: Callable[[str], None] = print,
) -> float:
    """Validate `path`; returns the loss of the one step it ran. Raises `ConfigError` listing
    every problem (with their count) before anything is built, or `MmembError` from the build."""
    check, problems = recipe_problems(path, overrides)
    if problems:
        raise ConfigError(problems, header=(
            f"{path}: {len(problems)} problem(s); nothing was built or run. Fix them and run "
            "`mmemb validate` again."
        ))
    loaded = check.loaded()
    r = loaded.recipe
    use_recipe_threads(r.train.threads)
    echo(f"recipe {path}: keys, values, components, input files and model path are valid")
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
        if not is_prepared(loaded.resolve_path(entry.shards)):
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

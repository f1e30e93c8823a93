"""`mmemb validate RECIPE [key=value ...]`."""

from __future__ import annotations

import click

from mmemb.cli.options import overrides_argument, recipe_argument


@click.command("validate")
@recipe_argument
@overrides_argument
def command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE: report every problem at once, build every component, run one step.

    First every problem is listed, each with its recipe line, and counted (exit status 1):
    unknown keys (with the closest valid one), bad values, unknown components and arguments,
    missing input files and image folders of datasets still to be prepared, and a backbone that
    is neither a local directory nor a cached hub model when offline (HF_HUB_OFFLINE=1) or the
    hub does not answer -- found in seconds, without network retries. A recipe without problems
    is then built and one training step runs on a few samples.

    \b
    Examples:
      mmemb validate recipes/quickstart.yaml
      mmemb validate recipes/llava_ov_7b.yaml model.backbone.path=/models/tiny-llava
    """
    from mmemb.validate import validate_recipe

    validate_recipe(recipe, overrides, echo=click.echo)

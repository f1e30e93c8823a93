"""`mmemb validate RECIPE [key=value ...]`."""

from __future__ import annotations

import click

from mmemb.cli.options import overrides_argument, recipe_argument


@click.command("validate")
@recipe_argument
@overrides_argument
def command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE: report every problem at once, build every component, run one step.

    \b
    Examples:
      mmemb validate recipes/quickstart.yaml
      mmemb validate recipes/llava_ov_7b.yaml model.backbone.path=/models/tiny-llava
    """
    from mmemb.validate import validate_recipe

    validate_recipe(recipe, overrides, echo=click.echo)

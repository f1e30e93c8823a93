"""`mmemb train RECIPE [key=value ...]`."""

from __future__ import annotations

import click

from mmemb.cli.options import overrides_argument, recipe_argument


@click.command("train")
@recipe_argument
@overrides_argument
def command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Train the model RECIPE describes; KEY=VALUE pairs override recipe keys.

    Prepares missing datasets that name a source, evaluates before and after training when the
    recipe lists eval data, and saves the encoder to OUTPUT_DIR/model. Launch under torchrun,
    srun or the deepspeed launcher for several processes.

    \b
    Examples:
      mmemb train recipes/quickstart.yaml
      mmemb train recipes/quickstart.yaml train.steps=50 loss.reweighter.alpha=2
      torchrun --nproc-per-node 8 -m mmemb train recipes/llava_ov_7b.yaml
    """
    from mmemb.recipe import load_recipe
    from mmemb.train import train

    loaded = load_recipe(recipe, overrides)
    train(loaded, echo=click.echo)

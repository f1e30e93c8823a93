"""`mmemb train RECIPE [key=value ...] [--resume latest|PATH] [--help-recipe]`."""

from __future__ import annotations

import sys

import click

from mmemb.cli.options import overrides_argument, recipe_argument


def recipe_header(path: str) -> str:
    """The comment block at the top of a recipe file (how to launch it, what it reproduces)."""
    lines = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                if line.strip():
                    break
                continue
            lines.append(line[1:].rstrip()[1:] if line.startswith("# ") else line[1:].rstrip())
    return "\n".join(lines).strip("\n")


@click.command("train")
@recipe_argument
@overrides_argument
@click.option(
    "--resume", metavar="latest|PATH", default=None,
    help="Continue from a checkpoint: 'latest' (the newest under OUTPUT_DIR/checkpoints, or a "
    "fresh start if there is none) or a checkpoint directory.",
)
@click.option(
    "--help-recipe", is_flag=True,
    help="Show the recipe's header (how to launch it) and the resolved settings, then exit.",
)
def command(recipe: str, overrides: tuple[str, ...], resume: str | None, help_recipe: bool) -> None:
    """Train the model RECIPE describes; KEY=VALUE pairs override recipe keys.

    Prepares missing datasets that name a source, evaluates before and after training when the
    recipe lists eval data, writes checkpoints to OUTPUT_DIR/checkpoints and saves the encoder to
    OUTPUT_DIR/model. Launch under torchrun, srun or the deepspeed launcher for several processes
    (docs/launch.md).

    On SIGTERM or SIGUSR1 (a scheduler's warning before it kills the job) training finishes the
    current step, writes a checkpoint and exits with status 75; rerun with `--resume latest`.
    With train.stop_on_collapse=true a collapsed run stops with status 3.

    \b
    Examples:
      mmemb train recipes/quickstart.yaml
      mmemb train recipes/quickstart.yaml train.steps=50 loss.reweighter.alpha=2
      mmemb train recipes/quickstart.yaml --resume latest
      mmemb train recipes/llava_ov_7b.yaml --help-recipe
      torchrun --nproc-per-node 8 -m mmemb train recipes/llava_ov_7b.yaml
    """
    from mmemb.recipe import load_recipe
    from mmemb.train import PREEMPTED_EXIT_CODE, Preempted, train
    from mmemb.train.collapse import COLLAPSED_EXIT_CODE, Collapsed

    loaded = load_recipe(recipe, overrides)
    if help_recipe:
        header = recipe_header(recipe)
        click.echo(header or f"{recipe}: no header comment.")
        click.echo("\n# resolved settings\n" + loaded.dump())
        return
    try:
        train(loaded, echo=click.echo, resume=resume)
    except Preempted as exc:
        click.echo(str(exc), err=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Collapsed as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(COLLAPSED_EXIT_CODE)

"""`mmemb train RECIPE [key=value ...] [--resume auto|latest|PATH] [--overwrite]`."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from types import FrameType
from typing import NoReturn

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


_EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _EarlyStop(BaseException):  # noqa: N818 - a requested stop
    """A signal before the trainer took over (the values repeat mmemb.train.preempt's exit
    codes: importing it means importing torch, the slow part this covers)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 75
        super().__init__(signum)


def _stop_early(signum: int, frame: FrameType | None) -> None:
    raise _EarlyStop(signum)


def resume_command(recipe: str, overrides: tuple[str, ...]) -> str:
    """The command line that was run, with ``--resume auto`` in place of any --resume/--overwrite:
    what to run again, unchanged, after a stop (the overrides decide output_dir, so they stay)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    prog = "python -m mmemb" if sys.argv and sys.argv[0].endswith("__main__.py") else "mmemb"
    words = shlex.split(prog)
    if root is not None and root.params.get("traceback") and not os.environ.get(
            "MMEMB_TRACEBACK"):
        words.append("--traceback")
    words += ["train", recipe, *overrides, "--resume", "auto"]
    return shlex.join(words)


@click.command("train")
@recipe_argument
@overrides_argument
@click.option(
    "--resume", metavar="auto|latest|PATH", default=None,
    help="Continue this run: 'auto' (the newest compatible checkpoint in OUTPUT_DIR, or a fresh "
    "start when there is none: the command a scheduler reruns), 'latest' (the same, but there "
    "must be one) or a checkpoint directory. A checkpoint whose recipe differs in more than "
    "steps, cadence and output paths is refused, listing the differences.",
)
@click.option(
    "--overwrite", is_flag=True,
    help="Allow replacing another run's checkpoints and model in OUTPUT_DIR (a fresh start "
    "deletes them first), or the checkpoints newer than --resume PATH.",
)
@click.option(
    "--help-recipe", is_flag=True,
    help="Show the recipe's header (how to launch it) and the resolved settings, then exit.",
)
def command(recipe: str, overrides: tuple[str, ...], resume: str | None, overwrite: bool,
            help_recipe: bool) -> None:
    """Train the model RECIPE describes; KEY=VALUE pairs override recipe keys.

    Prepares missing datasets that name a source, evaluates before and after training when the
    recipe lists eval data, writes checkpoints to OUTPUT_DIR/checkpoints and saves the encoder to
    OUTPUT_DIR/model. Launch under torchrun, srun or the deepspeed launcher for several processes
    (docs/launch.md).

    OUTPUT_DIR belongs to one run: a fresh start where another run's checkpoints or model exist
    is refused (pass --resume auto to continue it, --overwrite to replace it).

    Signals, in every phase: SIGTERM or SIGUSR1 (a scheduler's warning before it kills the job)
    exit with status 75, Ctrl-C (SIGINT) with 130; while steps run, the current step finishes
    and a checkpoint is written first. Either way the command to rerun is printed: the same
    command plus `--resume auto`. With train.stop_on_collapse=true a collapsed run stops with
    status 3.

    \b
    Examples:
      mmemb train recipes/quickstart.yaml
      mmemb train recipes/quickstart.yaml train.steps=50 loss.reweighter.alpha=2 \\
        output_dir=runs/alpha2
      mmemb train recipes/quickstart.yaml --resume auto
      mmemb train recipes/llava_ov_7b.yaml --help-recipe
      torchrun --nproc-per-node 8 -m mmemb train recipes/llava_ov_7b.yaml --resume auto
    """
    def stopped(message: str, code: int) -> NoReturn:
        launcher = (" under the same launcher" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                    or "SLURM_PROCID" in os.environ else "")
        click.echo(f"\n{message} To continue, run{launcher} in {os.getcwd()}:\n"
                   f"  {resume_command(recipe, overrides)}", err=True)
        sys.exit(code)

    # Signals while torch and the recipe load (seconds), before the trainer's own handling.
    previous = {sig: signal.signal(sig, _stop_early) for sig in _EARLY_SIGNALS}
    try:
        from mmemb.recipe import load_recipe
        from mmemb.threads import use_recipe_threads
        from mmemb.train import Stopped, train
        from mmemb.train.collapse import COLLAPSED_EXIT_CODE, Collapsed

        loaded = load_recipe(recipe, overrides)
        use_recipe_threads(loaded.recipe.train.threads)  # unless --threads/MMEMB_THREADS given
    except _EarlyStop as early:
        stopped(f"stopped by {signal.Signals(early.signum).name} while starting; no checkpoint "
                "written.", early.exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if help_recipe:
        header = recipe_header(recipe)
        click.echo(header or f"{recipe}: no header comment.")
        click.echo("\n# resolved settings\n" + loaded.dump())
        return
    try:
        train(loaded, echo=click.echo, resume=resume, overwrite=overwrite)
    except Stopped as exc:
        stopped(str(exc), exc.exit_code)
    except Collapsed as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(COLLAPSED_EXIT_CODE)

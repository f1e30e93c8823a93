"""The `mmemb` command line: a click group whose verbs are thin layers over package functions.

Verbs are imported only when run, so `mmemb --help` stays fast (no torch import). A `MmembError`
(a problem the user can fix) is shown as its message and exit code 1, without a traceback unless
`--traceback` (or MMEMB_TRACEBACK=1) asks for one.

Exit codes of every verb: 0 done, 1 a problem the user can fix, 75 stopped by SIGTERM/SIGUSR1
(requeue), 130 interrupted (Ctrl-C); `train` adds 3 (collapse, with train.stop_on_collapse).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from mmemb import __version__
from mmemb import threads as _threads
from mmemb.errors import MmembError

INTERRUPTED_EXIT_CODE = 130
"""After Ctrl-C (SIGINT); the same value as mmemb.train.INTERRUPTED_EXIT_CODE, repeated here so
`mmemb --help` does not import torch."""

# verb -> (module, one-line help shown by `mmemb --help`)
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("mmemb.cli.prepare", "Convert a dataset into WebDataset shards."),
    "mine": ("mmemb.cli.mine", "Mine hard negatives for shards with an embedding model."),
    "train": ("mmemb.cli.train", "Train an embedding model from a recipe."),
    "eval": ("mmemb.cli.eval", "Evaluate an embedding model (MMEB protocol, retrieval)."),
    "export": ("mmemb.cli.export", "Export a model (Hugging Face or sentence-transformers)."),
    "encode": ("mmemb.cli.encode", "Embed jsonl inputs into a .npy or .parquet file."),
    "validate": ("mmemb.cli.validate", "Check a recipe: build everything and run one step."),
    "plugins": ("mmemb.cli.plugins", "List registered plugins and components."),
}


class MmembGroup(click.Group):
    """Loads verbs lazily and turns `MmembError` into a one-line message and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in VERBS:
            return None
        module = importlib.import_module(VERBS[cmd_name][0])
        command: click.Command = module.command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help without importing every verb module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in VERBS.items()])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MmembError as exc:
            if ctx.obj and ctx.obj.get("traceback"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            # Ctrl-C: the status a shell reports for SIGINT, not click's "Aborted!" and 1.
            if ctx.obj and ctx.obj.get("traceback"):
                raise
            click.echo("\ninterrupted (Ctrl-C).", err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)


@click.group(cls=MmembGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmemb")
@click.option(
    "--traceback",
    is_flag=True,
    default=os.environ.get("MMEMB_TRACEBACK") == "1",
    help="Show the full traceback of errors (also MMEMB_TRACEBACK=1).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, envvar="MMEMB_THREADS",
    help="CPU threads for torch (also MMEMB_THREADS; default: the CPUs this process may use, "
    "or OMP_NUM_THREADS, or the recipe's train.threads). Goes before the verb.",
)
@click.pass_context
def cli(ctx: click.Context, traceback: bool, threads: int | None) -> None:
    """mmemb: train universal multimodal embedding models.

    \b
    The pipeline, on the offline quickstart's data and model:
      mmemb prepare --source synthetic --arg n=2000 --out data/train
      mmemb train recipes/quickstart.yaml     # prepares data/quickstart, trains, evaluates
      mmemb eval --model runs/quickstart/model --data data/quickstart/eval --out results/qs
      mmemb export --model runs/quickstart/model --out exported/
      mmemb encode --model exported/ --input items.jsonl --out emb.parquet
    """
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback
    _threads.use_cli_threads(threads)


def main() -> None:
    # Before any verb imports torch: OpenMP reads its wait policy only when torch loads it.
    _threads.prime_environment()
    cli(prog_name="mmemb")

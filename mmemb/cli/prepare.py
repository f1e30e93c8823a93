"""`mmemb prepare`: a dataset (through a `source` plugin) -> WebDataset shards + manifest."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from mmemb.cli.options import parse_key_values
from mmemb.errors import DataError
from mmemb.progress import Progress

EPILOG_HEADER = "Sources (--source NAME; extra arguments with --arg KEY=VALUE):"

PREEMPTED_EXIT_CODE = 75
"""After SIGTERM/SIGUSR1: EX_TEMPFAIL, "try again later", as `mmemb train` (the value is repeated,
not imported: importing mmemb.train pulls in torch)."""
INTERRUPTED_EXIT_CODE = 130
"""After Ctrl-C (SIGINT), as a shell reports it."""


@contextmanager
def _stops_cleanly(out: Path, command_line: str) -> Iterator[None]:
    """SIGTERM/SIGUSR1 and Ctrl-C stop prepare with its staging directory removed, one line
    saying so and how to go on, and exit status 75 / 130 (not a traceback)."""
    from mmemb.data.prepare import PrepareInterrupted, stop_on_signals

    def stopped(what: str, code: int) -> None:
        click.echo(
            f"\nprepare {what}: {out} was not written and its staging directory was removed. "
            f"Run the same command again to redo it: {command_line}",
            err=True,
        )
        sys.exit(code)

    try:
        with stop_on_signals():
            yield
    except PrepareInterrupted as exc:
        stopped(str(exc), PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        stopped("interrupted (Ctrl-C)", INTERRUPTED_EXIT_CODE)


def _source_help() -> list[tuple[str, str, str, str]]:
    """(name, summary, arguments, example) for every registered source."""
    from pydantic_core import PydanticUndefined

    from mmemb import plugins

    rows = []
    for name in plugins.available("source"):
        comp = plugins.get("source", name)
        example = getattr(comp.factory, "example", "") or f"mmemb prepare --source {name} --out DIR"
        args = []
        for field_name, info in comp.config.model_fields.items() if comp.config else []:
            if field_name in ("input", "image_root"):  # shown as --input / --image-root
                flag = "--input" if field_name == "input" else "--image-root"
                args.append(flag + (" (required)" if info.is_required() else ""))
                continue
            default = info.get_default(call_default_factory=True)
            shown = "required" if default is PydanticUndefined else repr(default)
            args.append(f"{field_name}={shown}")
        rows.append((name, comp.summary, ", ".join(args), example))
    return rows


class _PrepareCommand(click.Command):
    """Lists the registered sources with an example each below the options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            rows = _source_help()
        except Exception as exc:  # noqa: BLE001 - --help must work even if a plugin is broken
            formatter.write_paragraph()
            formatter.write_text(f"(could not list sources: {exc})")
            return
        formatter.write_paragraph()
        formatter.write_text(EPILOG_HEADER)
        with formatter.indentation():
            for name, summary, arguments, example in rows:
                formatter.write_paragraph()
                formatter.write_text(f"{name}: {summary}")
                with formatter.indentation():
                    if arguments:
                        formatter.write_text(f"arguments: {arguments}")
                    for line in example.splitlines():
                        formatter.write(" " * formatter.current_indent + line + "\n")
        formatter.write_paragraph()
        formatter.write_text(
            "Each source's arguments: `mmemb plugins list` or docs/data.md. Bad rows (missing or "
            "corrupt image, missing field, empty text, duplicate id) stop prepare with file, line "
            "and reason, or with --on-error skip are counted and written to rejects.jsonl."
        )


def _rows_line(bar: Progress) -> str:
    return (f"prepare: read {bar.done} written {bar.fields.get('written', 0)} rejected "
            f"{bar.fields.get('rejected', 0)} ({bar.rate:.0f} rows/s)")


class _Reporter:
    """prepare's `progress(read, written, rejected)` callback on the shared `Progress`: a bar on a
    terminal, a plain line every `every` rows otherwise."""

    def __init__(self, total: int | None, every: int) -> None:
        # no plain line at the end: the report printed after it says the same
        self.bar = Progress(total, desc="prepare", log_every=every, line=_rows_line,
                            end_line=False)

    def __call__(self, read: int, written: int, rejected: int) -> None:
        self.bar.update(read - self.bar.done, written=written, rejected=rejected)

    def close(self) -> None:
        self.bar.close()


def _command_line(ctx: click.Context) -> str:
    """The command as it could be typed again, rebuilt from the parsed options."""
    words = ["mmemb", "prepare"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if value is None or value is False or value == () or value == param.default:
            continue
        flag = param.opts[0]
        if param.is_flag:
            words.append(flag)
        elif isinstance(value, tuple):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _prepare_recipe(recipe: str, overwrite: bool, on_error: str, every: int,
                    workers: int) -> None:
    from mmemb.data.prepare import prepare_recipe_data
    from mmemb.recipe import DataEntry, load_recipe

    loaded = load_recipe(recipe, check_components=False)
    command_line = f"mmemb prepare --recipe {shlex.quote(recipe)}"

    @contextmanager
    def around(entry: DataEntry, out: Path) -> Iterator[_Reporter]:
        reporter = _Reporter(entry.limit, every)
        try:
            with _stops_cleanly(out, command_line):
                yield reporter
        finally:
            reporter.close()

    prepare_recipe_data(
        loaded, command=command_line, overwrite=overwrite,
        on_error=on_error,  # type: ignore[arg-type]
        workers=workers, missing_source="skip", echo=click.echo, around=around,
    )


@click.command("prepare", cls=_PrepareCommand)
@click.option(
    "--source", "source", metavar="NAME", help="Source plugin that reads the input (listed below)."
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="PATH",
    help="Input file, directory or glob (repeatable); meaning depends on the source.",
)
@click.option(
    "--image-root",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Directory that relative image paths in the input are resolved against.",
)
@click.option("--out", type=click.Path(), metavar="DIR", help="Output directory for the shards.")
@click.option(
    "--dataset-name",
    metavar="NAME",
    help="Dataset name for every sample (default: chosen by the source, e.g. the file name).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Read at most N input rows (read = written + rejected still holds).",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="fail: stop at the first bad row (file, line, reason). skip: count it by "
    "reason and write it to rejects.jsonl.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing prepared --out directory.")
@click.option(
    "--shard-size",
    default="1000",
    show_default=True,
    metavar="N|SIZE",
    help="Samples per shard (1000), or a byte size per shard (500MB, 1GiB).",
)
@click.option(
    "--max-image-side",
    type=click.IntRange(min=1),
    metavar="PX",
    help="Downscale images whose longer side exceeds PX (others keep their bytes).",
)
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra source argument (repeatable); VALUE is read as YAML (n=100, tasks=[t2i]).",
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    metavar="RECIPE",
    help="Prepare every data entry of RECIPE that names a source (instead of --source).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Processes that decode and check images (the slow part); the output does not depend "
    "on N.",
)
@click.option(
    "--log-every",
    default=1000,
    show_default=True,
    metavar="N",
    help="Without a terminal, print a progress line every N rows.",
)
def command(
    source: str | None,
    inputs: tuple[str, ...],
    image_root: str | None,
    out: str | None,
    dataset_name: str | None,
    limit: int | None,
    on_error: str,
    overwrite: bool,
    shard_size: str,
    max_image_side: int | None,
    args: tuple[str, ...],
    recipe: str | None,
    workers: int,
    log_every: int,
) -> None:
    """Convert a dataset into WebDataset shards + manifest.json for training or evaluation.

    Images keep their original JPEG/PNG bytes (other formats become PNG; --max-image-side
    downscales). Output is written to OUT.partial and renamed to OUT when complete; OUT is
    never replaced without --overwrite. SIGTERM/SIGUSR1 (exit 75) and Ctrl-C (exit 130) remove
    OUT.partial; one left by a killed prepare is removed by the next run. Prints `read N =
    written W + rejected R`.

    \b
    Examples:
      mmemb prepare --source synthetic --arg n=2000 --shard-size 500 --out data/synth-2k
      mmemb prepare --source mmeb_train --input MMEB-train/CIRR --image-root MMEB-train \\
          --out shards/cirr --on-error skip --workers 8
      mmemb prepare --recipe recipes/quickstart.yaml
    """
    from mmemb.data.prepare import parse_shard_size, prepare

    if recipe is not None:
        if source is not None or out is not None:
            raise DataError("give either --recipe or --source/--out, not both.")
        _prepare_recipe(recipe, overwrite, on_error, log_every, workers)
        return
    if source is None or out is None:
        raise DataError(
            "--source and --out are required (or --recipe). See `mmemb prepare --help`."
        )
    source_args = parse_key_values(args, flag="--arg")
    if inputs:
        source_args["input"] = inputs[0] if len(inputs) == 1 else list(inputs)
    if image_root is not None:
        source_args["image_root"] = image_root
    size: int | str = int(shard_size) if shard_size.strip().isdigit() else shard_size
    parse_shard_size(size)  # a bad value fails before any reading
    total = limit
    if total is None and isinstance(source_args.get("n"), int):
        total = source_args["n"]  # the synthetic generator knows its length
    reporter = _Reporter(total, log_every)
    command_line = _command_line(click.get_current_context())
    try:
        with _stops_cleanly(Path(out), command_line):
            report = prepare(
                source,
                source_args,
                out,
                dataset_name=dataset_name,
                limit=limit,
                on_error=on_error,  # type: ignore[arg-type]
                overwrite=overwrite,
                shard_size=size,
                max_image_side=max_image_side,
                command=command_line,
                progress=reporter,
                workers=workers,
            )
    finally:
        reporter.close()
    click.echo(str(report))

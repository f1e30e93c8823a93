"""`mmemb mine --model DIR --data SHARDS --out DIR`."""

from __future__ import annotations

import click

from mmemb.cli.options import MODEL_HELP, model_options, model_source, parse_key_values


@click.command("mine")
@model_options(help="The encoder that ranks candidates. " + MODEL_HELP)
@click.option("--data", required=True, multiple=True, help="Prepared shard directory (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New shard directory.")
@click.option("--miner", default="knn", show_default=True, help="Miner plugin name.")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A miner argument (repeatable), e.g. --arg num_negatives=7 --arg rank_start=3.",
)
@click.option(
    "--mode",
    type=click.Choice(["replace", "append"]),
    default="replace",
    show_default=True,
    help="Replace the samples' negatives, or add to them.",
)
@click.option(
    "--corpus",
    default=None,
    type=click.Path(exists=True),
    help="Extra candidates for every dataset: a jsonl file of items (text/image/instruction; "
    "image paths relative to the file) or a prepared shard directory.",
)
@click.option(
    "--min-negatives",
    default=None,
    type=click.IntRange(min=0),
    help="Samples with fewer negatives are short (default: the miner's num_negatives).",
)
@click.option(
    "--on-short",
    type=click.Choice(["drop", "keep", "fill"]),
    default="drop",
    show_default=True,
    help="Short samples: drop them; keep them (the shards' negatives.min drops, and with it the "
    "train.negatives they allow); or fill them with random pool items. Counted and warned.",
)
@click.option(
    "--scores",
    is_flag=True,
    help="Store each sample's positive and negative scores in its meta (meta.mining).",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: when stderr is a terminal).",
)
def command(
    model: str,
    backbone: str | None,
    pooler: str | None,
    model_args: tuple[str, ...],
    data: tuple[str, ...],
    out: str,
    miner: str,
    args: tuple[str, ...],
    mode: str,
    corpus: str | None,
    min_negatives: int | None,
    on_short: str,
    scores: bool,
    batch_size: int,
    seed: int,
    overwrite: bool,
    progress: bool | None,
) -> None:
    """Mine hard negatives: rank each dataset's candidate pool with a model, drop likely false
    negatives, keep a rank window of what survives, and write new shards with a mining report in
    the manifest. The knn miner's arguments (--arg): num_negatives, rank_start, rank_end,
    relative_margin, margin, max_score, min_score, sample (docs/mining.md).

    \b
    Example:
      mmemb mine --model runs/quickstart/model --data data/quickstart/train \\
        --out data/quickstart/train-mined --arg num_negatives=3 --arg rank_start=2
    """
    import sys

    from mmemb.mine import mine

    spec: dict[str, object] = {"name": miner, **parse_key_values(args, flag="--arg")}
    report = mine(
        model_source(model, backbone, pooler, model_args),
        list(data),
        out,
        miner=spec,
        mode=mode,  # type: ignore[arg-type]
        corpus=corpus,
        min_negatives=min_negatives,
        on_short=on_short,  # type: ignore[arg-type]
        scores=scores,
        batch_size=batch_size,
        seed=seed,
        overwrite=overwrite,
        show_progress=sys.stderr.isatty() if progress is None else progress,
        echo=lambda line: click.echo(line, err=line.startswith("warning:")),
    )
    click.echo(str(report))

"""`mmemb mine --model DIR --data SHARDS --out DIR`."""

from __future__ import annotations

import click


@click.command("mine")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="The encoder that ranks candidates (a trained or exported directory).",
)
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
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def command(
    model_dir: str,
    data: tuple[str, ...],
    out: str,
    miner: str,
    args: tuple[str, ...],
    mode: str,
    batch_size: int,
    seed: int,
    overwrite: bool,
) -> None:
    """Mine hard negatives: rank each dataset's candidate pool with a model, keep a rank window,
    drop likely false negatives, and write new shards with a mining report in the manifest.

    \b
    Example:
      mmemb mine --model runs/quickstart/model --data data/quickstart/train \\
        --out data/quickstart/train-mined --arg num_negatives=3 --arg rank_start=2
    """
    from mmemb.mine import mine
    from mmemb.recipe import parse_override

    spec: dict[str, object] = {"name": miner}
    for text in args:
        keys, value = parse_override(text)
        spec[".".join(keys)] = value
    report = mine(
        model_dir,
        list(data),
        out,
        miner=spec,
        mode=mode,  # type: ignore[arg-type]
        batch_size=batch_size,
        seed=seed,
        overwrite=overwrite,
        echo=click.echo,
    )
    click.echo(str(report))

"""`mmemb export --model DIR --out DIR`."""

from __future__ import annotations

import click


@click.command("export")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="A trained encoder directory (OUTPUT_DIR/model of `mmemb train`).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write.")
@click.option("--exporter", default="hf", show_default=True, help="Exporter plugin name.")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="An exporter argument (repeatable), e.g. --arg overwrite=true.",
)
def command(model_dir: str, out: str, exporter: str, args: tuple[str, ...]) -> None:
    """Export a trained encoder: merge LoRA, check embeddings, write a Hugging Face directory.

    \b
    Example:
      mmemb export --model runs/quickstart/model --out exported/quickstart
    """
    from mmemb.export import export_model
    from mmemb.recipe import parse_override

    spec: dict[str, object] = {"name": exporter}
    for text in args:
        keys, value = parse_override(text)
        spec[".".join(keys)] = value
    path = export_model(model_dir, out, exporter=spec)
    click.echo(f"exported to {path}")

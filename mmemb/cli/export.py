"""`mmemb export --model DIR --out DIR [--format hf|sentence-transformers]`."""

from __future__ import annotations

import click

from mmemb.cli.options import MODEL_HELP, model_options, model_source, parse_key_values


@click.command("export")
@model_options(help="The encoder to export. " + MODEL_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write.")
@click.option(
    "--format", "--exporter", "fmt", default="hf", show_default=True, metavar="FORMAT",
    help="hf (a transformers directory + mmemb.json + model card) or sentence-transformers "
         "(text backbones); any registered exporter plugin name works too.",
)
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="An exporter argument (repeatable): overwrite=true, atol=1e-4, model_card=false, "
         "recipe=PATH and results=PATH (provenance for the model card when it is not next to "
         "the model).",
)
def command(
    model: str, backbone: str | None, pooler: str | None, model_args: tuple[str, ...],
    out: str, fmt: str, args: tuple[str, ...],
) -> None:
    """Export an encoder: merge LoRA, check embeddings, write a Hugging Face or
    sentence-transformers directory with the prompt template, pooling and a model card.

    \b
    Examples:
      mmemb export --model runs/quickstart --out exported/quickstart
      mmemb export --model all-MiniLM-L6-v2/ --out exported/st --format sentence-transformers
    """
    from mmemb.export import FORMATS, export_model

    spec: dict[str, object] = {
        "name": FORMATS.get(fmt, fmt), **parse_key_values(args, flag="--arg")
    }
    path = export_model(model_source(model, backbone, pooler, model_args), out, exporter=spec)
    click.echo(f"exported to {path}")

"""`mmemb encode --model DIR --input items.jsonl --out emb.npy`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import click

from mmemb.cli.options import model_options, model_source


@click.command("encode")
@model_options()
@click.option(
    "--input",
    "input_path",
    default="-",
    show_default=True,
    help="jsonl items (text/image/instruction/id per line); '-' reads stdin.",
)
@click.option(
    "--out", required=True,
    help="Output file: .npy (float32 matrix, a row per item) or .parquet (id, embedding).",
)
@click.option(
    "--side",
    type=click.Choice(["query", "target"]),
    default="query",
    show_default=True,
    help="Which prompt template the backbone uses.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--image-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Image paths are relative to this folder (default: the current one).",
)
def command(
    model: str, backbone: str | None, pooler: str | None, model_args: tuple[str, ...],
    input_path: str, out: str, side: str, batch_size: int, image_root: str | None,
) -> None:
    """Embed jsonl items with a trained encoder.

    \b
    Examples:
      echo '{"text": "a red circle above a blue square"}' | \\
        mmemb encode --model runs/quickstart/model --out emb.npy
      mmemb encode --model all-MiniLM-L6-v2/ --input docs.jsonl --out emb.parquet
      mmemb encode --model intfloat/e5-small-v2 --backbone hf_text --pooler mean \\
        --model-arg "query_instruction='query: '" --input q.jsonl --out q.npy
    """
    from mmemb.embed_file import encode_items
    from mmemb.model import Side

    model_dir = model_source(model, backbone, pooler, model_args)
    root = Path(image_root) if image_root else None
    which = cast("Side", side)
    if input_path == "-":
        n = encode_items(
            model_dir,
            sys.stdin,
            out,
            side=which,
            batch_size=batch_size,
            source="<stdin>",
            image_root=root,
        )
    else:
        with open(input_path) as fh:
            n = encode_items(
                model_dir,
                fh,
                out,
                side=which,
                batch_size=batch_size,
                source=input_path,
                image_root=root,
            )
    click.echo(f"encoded {n} items -> {out}")

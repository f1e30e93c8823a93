"""`mmemb export`: turn a trained encoder directory into a publishable artefact via an exporter."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder, read_encoder_spec
from mmemb.model import Encoder


class Exporter(Protocol):
    """What an `exporter` plugin builds: `export` writes `out` and returns it."""

    def export(self, encoder: Encoder, *, spec: Mapping[str, Any], out: Path) -> Path: ...


def probe_items() -> list[Item]:
    """A few text, image and image+text items to compare embeddings before and after export."""
    from PIL import Image, ImageDraw

    images = []
    for i, colour in enumerate([(220, 40, 40), (40, 90, 220)]):
        img = Image.new("RGB", (48, 48), (250, 250, 250))
        ImageDraw.Draw(img).rectangle([6 + 4 * i, 8, 30 + 6 * i, 36], fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(buf.getvalue())
    return [
        Item(text="a red square on a white background"),
        Item(text="two birds over the sea", instruction="Find an image that matches the caption."),
        Item(image=images[0]),
        Item(
            image=images[1],
            text="what colour is the shape?",
            instruction="Represent the given image with the following question:",
        ),
    ]


def export_model(
    model_dir: str | Path, out: str | Path, *, exporter: str | Mapping[str, Any] = "hf"
) -> Path:
    """Load the encoder saved in `model_dir` and write it with the named exporter to `out`."""
    encoder = load_encoder(model_dir)
    built: Exporter = plugins.build_from("exporter", exporter, where="--exporter")
    return built.export(encoder, spec=read_encoder_spec(model_dir), out=Path(out))

"""`mmemb encode`: stream jsonl items to embeddings, for pipelines.

Each input line is one item: ``{"text": ..., "image": "path/to/img.jpg", "instruction": ...}``
(at least one of text and image; image paths relative to `image_root`). The output is a float32
``.npy`` matrix, one row per input line, in input order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder
from mmemb.errors import DataError
from mmemb.model import Side


def read_items(lines: Iterable[str], *, source: str, image_root: Path | None) -> Iterator[Item]:
    """Parse jsonl item lines; every bad line is an error naming its line number."""
    root = image_root or Path(".")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{source}:{lineno}: expected an object with text/image (got {row!r})")
        unknown = set(row) - {"text", "image", "instruction", "id"}
        if unknown:
            raise DataError(
                f"{source}:{lineno}: unknown field(s) {sorted(unknown)}; "
                "use text, image, instruction"
            )
        image = None
        if row.get("image"):
            path = root / row["image"]
            if not path.is_file():
                raise DataError(f"{source}:{lineno}: image {path} does not exist (--image-root?)")
            image = path.read_bytes()
        text = row.get("text") or None
        if text is None and image is None:
            raise DataError(f"{source}:{lineno}: the item has neither text nor image")
        yield Item(text=text, image=image, instruction=row.get("instruction") or None)


def encode_items(
    model_dir: str | Path,
    lines: Iterable[str],
    out: str | Path,
    *,
    side: Side = "query",
    batch_size: int = 32,
    source: str = "<stdin>",
    image_root: Path | None = None,
) -> int:
    """Embed the items in `lines` with the encoder in `model_dir`; write `out` (.npy); return N."""
    encoder = load_encoder(model_dir)
    items = list(read_items(lines, source=source, image_root=image_root))
    emb = encoder.encode(items, side=side, batch_size=batch_size).numpy().astype(np.float32)
    out_path = Path(out)
    if out_path.suffix != ".npy":
        raise DataError(f"--out {out}: only .npy output is supported; name the file *.npy")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, emb)
    return len(items)

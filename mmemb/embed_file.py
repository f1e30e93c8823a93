"""Embed jsonl items into a file (.npy or .parquet), for pipelines: the work behind `mmemb encode`.

Each input line is one item: ``{"text": ..., "image": "path/to/img.jpg", "instruction": ...,
"id": ...}`` (at least one of text and image; image paths relative to `image_root`). Items are
read `SORT_WINDOW` batches at a time, so the input never sits in memory; each window is encoded
longest first in batches of similar length (`mmemb.batching`) and written in input order. The
output, by its suffix:

- ``.npy``: a float32 matrix, one row per input item, in input order;
- ``.parquet``: columns ``id`` (the item's ``id``, else its line number) and ``embedding``
  (a fixed-size list of float32), written a row group at a time (needs ``mmemb[parquet]``).

The file appears only when complete (written to a temporary name, then renamed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmemb.batching import encode_sorted
from mmemb.data.schema import Item
from mmemb.encoder_io import ModelSource, load_encoder
from mmemb.errors import DataError
from mmemb.fileio import atomic_path
from mmemb.model import Side

FORMATS = (".npy", ".parquet")
SORT_WINDOW = 16
"""Batches read before sorting by length: more sorts better, fewer holds less in memory."""


def read_items(
    lines: Iterable[str], *, source: str, image_root: Path | None
) -> Iterator[tuple[str, Item]]:
    """Parse jsonl item lines into (id, item); the id is the line's ``id`` or its line number.
    Every bad line is an error naming its line number."""
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
        item_id = str(row["id"]) if row.get("id") is not None else str(lineno)
        yield item_id, Item(text=text, image=image, instruction=row.get("instruction") or None)


class EmbeddingWriter(Protocol):
    def write(self, ids: list[str], emb: np.ndarray) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class NpyWriter:
    """Collects the rows (a .npy header needs the row count) and saves them at `close`."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self.parts: list[np.ndarray] = []

    def write(self, ids: list[str], emb: np.ndarray) -> None:
        self.parts.append(emb)

    def close(self) -> None:
        emb = np.concatenate(self.parts) if self.parts else np.zeros((0, self.dim), np.float32)
        with open(self.path, "wb") as fh:  # np.save on a path would append ".npy"
            np.save(fh, emb)

    def abort(self) -> None:
        self.parts.clear()


class ParquetWriter:
    """Writes one row group per call: ids and fixed-size float32 embedding lists."""

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(
                f"--out {path}: parquet output needs pyarrow: pip install 'mmemb[parquet]' (or "
                "write .npy)"
            ) from exc
        self.pa, self.pq, self.path = pa, pq, path
        self.writer: Any = None

    def write(self, ids: list[str], emb: np.ndarray) -> None:
        pa = self.pa
        values = pa.array(emb.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
        table = pa.table({"id": pa.array(ids, type=pa.string()), "embedding": column})
        if self.writer is None:
            self.writer = self.pq.ParquetWriter(str(self.path), table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is None:  # no items: an empty file with the schema
            pa = self.pa
            schema = pa.schema([("id", pa.string()),
                                ("embedding", pa.list_(pa.float32(), self.dim))])
            self.writer = self.pq.ParquetWriter(str(self.path), schema)
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check_format(out: Path) -> None:
    if out.suffix not in FORMATS:
        raise DataError(f"--out {out}: unknown output format {out.suffix!r}; name the file "
                        f"{' or '.join('*' + f for f in FORMATS)}")


def open_writer(out: Path, tmp: Path, dim: int) -> EmbeddingWriter:
    """A writer for `out`'s format that writes `tmp`; `dim` is the embedding width."""
    check_format(out)
    return NpyWriter(tmp, dim) if out.suffix == ".npy" else ParquetWriter(tmp, dim)


def encode_items(
    model_dir: str | Path | ModelSource,
    lines: Iterable[str],
    out: str | Path,
    *,
    side: Side = "query",
    batch_size: int = 32,
    source: str = "<stdin>",
    image_root: Path | None = None,
    sort_window: int = SORT_WINDOW,
) -> int:
    """Embed the items in `lines` with the encoder in `model_dir`, `sort_window` batches at a
    time; write `out` (.npy or .parquet, see the module docstring); return the number of items."""
    out_path = Path(out)
    check_format(out_path)  # before the (slow) model load
    encoder = load_encoder(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_path(out_path) as tmp:
        writer = open_writer(out_path, tmp, encoder.backbone.hidden_size)
        items = read_items(lines, source=source, image_root=image_root)
        try:
            while window := list(islice(items, batch_size * sort_window)):
                ids = [i for i, _ in window]
                emb = encode_sorted(encoder, [it for _, it in window], side=side,
                                    batch_size=batch_size)
                writer.write(ids, emb.numpy().astype(np.float32))
                n += len(window)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return n

"""Small real building blocks for tests and benchmarks of the data pipeline (no model needed).

- `ByteProcessor`: a real `InputProcessor` — texts become UTF-8 byte ids, images are decoded with
  PIL and resized to a fixed square — so collation and streaming are tested end to end without a
  backbone.
- `jpeg_bytes` / `png_bytes`: genuinely encoded images (with a pattern, so files differ).
- `text_samples`: quick text-only samples to fill shards.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmemb.data.schema import Item, Sample
from mmemb.model import InputProcessor, ModelInputs, Side


class ByteProcessor(InputProcessor):
    """Items -> ``input_ids`` (N, max_len) UTF-8 bytes + 1 (0 = padding), ``attention_mask``,
    ``pixel_values`` (N, 3, S, S) in [0, 1] (zeros without an image) and ``has_image`` (N,).

    The instruction, if any, is prepended to the text as ``"{instruction} {text}"``; the side is
    marked by a first token (1 = query, 2 = target), as real backbones prompt the sides differently.
    """

    def __init__(self, max_len: int = 32, image_size: int = 16) -> None:
        self.max_len = max_len
        self.image_size = image_size

    def _pixels(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size))
            arr = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        n, length, s = len(items), self.max_len, self.image_size
        ids = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        pixels = torch.zeros(n, 3, s, s)
        has_image = torch.zeros(n, dtype=torch.long)
        for i, item in enumerate(items):
            text = " ".join(t for t in (item.instruction, item.text) if t)
            tokens = [1 if side == "query" else 2] + [b + 3 for b in text.encode()][: length - 1]
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
            if item.image is not None:
                pixels[i] = self._pixels(item.image)
                has_image[i] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "has_image": has_image,
        }

    def save_pretrained(self, path: str | Path) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "byte_processor.json").write_text(
            f'{{"max_len": {self.max_len}, "image_size": {self.image_size}}}\n'
        )


def _pattern(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (24, 16)) -> bytes:
    """A real JPEG (random pattern from `seed`)."""
    buf = io.BytesIO()
    _pattern(size, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (16, 24)) -> bytes:
    """A real PNG (random pattern from `seed`)."""
    buf = io.BytesIO()
    _pattern(size, seed).save(buf, format="PNG")
    return buf.getvalue()


def text_samples(n: int, dataset: str = "toy", negatives: int = 2, start: int = 0) -> list[Sample]:
    """`n` text-only samples ``{dataset}-{i}`` with `negatives` negatives each."""
    return [
        Sample(
            id=f"{dataset}-{i}",
            dataset=dataset,
            query=Item(text=f"query {i}", instruction="Find the match."),
            pos=Item(text=f"positive {i}"),
            negs=[Item(text=f"negative {i}.{j}") for j in range(negatives)],
        )
        for i in range(start, start + n)
    ]

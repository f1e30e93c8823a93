"""Reading + decoding throughput: prepared shards (0, 1, 2 workers) vs the jsonl + image folder.

    python benchmarks/data.py                      # 2000 samples, 2 JPEGs each, 3 repeats
    python benchmarks/data.py --samples 5000 --image-side 384 --repeats 5

The script builds one dataset in a temporary directory: a jsonl file whose rows name a query
caption, a positive image and a hard-negative image in an image folder (real JPEGs of a smooth
pattern with shapes, ~`--image-side` px), then prepares it into shards (`mmemb prepare --source
jsonl`). It times the same samples read three ways, each decoding every image to RGB pixels:

- ``jsonl+folder``: the `jsonl` source read directly (each row parsed, each image file opened);
- ``shards/Nw``: `TrainStream` over the shards with N DataLoader workers (N = 0 reads in the main
  process), shuffle buffer 1000, batches of 32, one epoch; decoding runs where collation runs.

Methods are interleaved repeat by repeat (a busy machine slows them alike); the summary prints the
median samples/s and the ratio to ``jsonl+folder``. On a machine with few cores, workers compete
with the main process, so the 2-worker gain is bounded by the cores that are actually free.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmemb import plugins
from mmemb.data.prepare import prepare
from mmemb.data.schema import Item, Sample
from mmemb.data.stream import TrainStream


def _image(rng: random.Random, side: int) -> bytes:
    """A JPEG that compresses like a photo more than like noise: gradient + a few shapes."""
    x = np.linspace(0, 1, side)[None, :, None]
    y = np.linspace(0, 1, side)[:, None, None]
    base = np.array([rng.random(), rng.random(), rng.random()])[None, None, :]
    arr = (255 * np.clip(base * 0.6 + 0.4 * (x * y), 0, 1)).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(arr, (side, side, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(side), rng.randrange(side)
        r = rng.randrange(side // 16, side // 4)
        color = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: Path, n: int, side: int) -> Path:
    """`n` rows in root/rows.jsonl, images in root/images; returns the jsonl path."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        for role in ("pos", "neg"):
            (images / f"{i:06d}_{role}.jpg").write_bytes(_image(rng, side))
        rows.append(
            {
                "id": f"s{i}",
                "query": {"text": f"caption number {i}", "instruction": "Find it."},
                "pos": {"image": f"images/{i:06d}_pos.jpg"},
                "neg": [{"image": f"images/{i:06d}_neg.jpg"}],
            }
        )
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _decode(item: Item) -> int:
    if item.image is None:
        return 0
    with Image.open(io.BytesIO(item.image)) as im:
        return int(np.asarray(im.convert("RGB")).shape[0])


class DecodeAll:
    """A collate function that decodes every image of every sample (what a processor would do)
    and returns only the sample count, so worker -> main transfer is not what is measured."""

    def __call__(self, samples: Sequence[Sample]) -> int:
        for s in samples:
            for item in (s.query, s.pos, *s.negs):
                _decode(item)
        return len(samples)


def time_direct(jsonl: Path) -> tuple[int, float]:
    source = plugins.build("source", "jsonl", input=str(jsonl))
    decode = DecodeAll()
    start = time.perf_counter()
    n = 0
    for record in source:
        assert isinstance(record, Sample)
        n += decode([record])
    return n, time.perf_counter() - start


def time_shards(shards: Path, workers: int) -> tuple[int, float]:
    stream = TrainStream(
        [(shards, 1.0)],
        batch_size=32,
        collate=DecodeAll(),
        seed=0,
        num_workers=workers,
        shuffle_buffer=1000,
        epochs=1,
        drop_last=False,
    )
    start = time.perf_counter()
    n = sum(stream)
    return n, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mmemb-bench-data-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        jsonl = make_dataset(root / "raw", args.samples, args.image_side)
        report = prepare(
            "jsonl", {"input": str(jsonl)}, root / "shards", shard_size=args.shard_size
        )
        size = sum(p.stat().st_size for p in (root / "raw" / "images").iterdir())
        print(
            f"dataset: {args.samples} samples, {2 * args.samples} JPEGs "
            f"({size / 2 / args.samples / 1024:.1f} KiB each, {args.image_side}px); "
            f"made + prepared in {time.perf_counter() - t0:.1f}s: {report}"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}"
        )

        methods: dict[str, Callable[[], tuple[int, float]]] = {
            "jsonl+folder": lambda: time_direct(jsonl)
        }
        for w in args.workers:
            methods[f"shards/{w}w"] = lambda w=w: time_shards(root / "shards", w)  # type: ignore[misc]
        rates: dict[str, list[float]] = {name: [] for name in methods}
        for fn in methods.values():  # warm-up: page cache, imports, worker start-up code
            fn()
        for rep in range(args.repeats):
            for name, fn in methods.items():
                n, seconds = fn()
                if n != args.samples:
                    raise SystemExit(f"{name} read {n} samples, expected {args.samples}")
                rates[name].append(n / seconds)
            print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()))
        base = statistics.median(rates["jsonl+folder"])
        print("\nmethod          samples/s (median)   vs jsonl+folder")
        for name, values in rates.items():
            med = statistics.median(values)
            print(f"{name:<15} {med:>18.0f}   {med / base:>14.2f}x")


if __name__ == "__main__":
    main()

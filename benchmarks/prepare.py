"""`mmemb prepare` throughput with 1 vs N worker processes on the same input.

    python benchmarks/prepare.py                         # 1500 samples, 2 JPEGs each, 3 repeats
    python benchmarks/prepare.py --samples 4000 --workers 1 2 4 --max-image-side 192

The dataset is `benchmarks/data.py`'s (a jsonl of captions naming a positive and a hard-negative
JPEG in an image folder). Every image is fully decoded and checked; with `--max-image-side`
(default 128, below the images' side) every image is also downscaled and re-encoded, which is
the costly case that `--workers` exists for. Worker counts are interleaved repeat by repeat; the
summary prints the median samples/s and the speed-up over 1 worker. The outputs of all worker
counts are checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mmemb.data.prepare import prepare


def _make_dataset() -> object:
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("data.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_dataset


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--image-side", type=int, default=384)
    parser.add_argument("--max-image-side", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    make_dataset = _make_dataset()
    with tempfile.TemporaryDirectory(prefix="mmemb-bench-prepare-") as tmp:
        root = Path(tmp)
        jsonl = make_dataset(root / "raw", args.samples, args.image_side)  # type: ignore[operator]
        print(f"dataset: {args.samples} samples, {2 * args.samples} JPEGs of {args.image_side}px, "
              f"max_image_side={args.max_image_side}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}")
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        reference: dict[str, bytes] | None = None
        for rep in range(args.repeats):
            for w in args.workers:
                out = root / f"out-{w}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                report = prepare("jsonl", {"input": str(jsonl)}, out, workers=w,
                                 max_image_side=args.max_image_side, shard_size=500)
                rates[w].append(report.written / (time.perf_counter() - t0))
                shards = _shards(out)
                if reference is None:
                    reference = shards
                elif shards != reference:
                    raise SystemExit(f"{w} workers wrote different shards than the first run")
            print(f"repeat {rep + 1}: "
                  + ", ".join(f"{w}w {v[-1]:.0f}/s" for w, v in rates.items()))
        base = statistics.median(rates[args.workers[0]])
        print(f"\nworkers   samples/s (median)   vs {args.workers[0]} worker(s)")
        for w, values in rates.items():
            med = statistics.median(values)
            print(f"{w:<9} {med:>18.0f}   {med / base:>8.2f}x")


if __name__ == "__main__":
    main()

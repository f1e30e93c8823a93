"""Real handwritten digits as an image-classification set (image -> class name), for the
from-scratch multimodal study.

scikit-learn's `load_digits` (1,797 scans of digits written by 43 people, 8x8, 17 grey levels;
the UCI "optdigits" test set) is upscaled to `--size` pixels (nearest neighbour: the 8x8 cells stay
sharp) and written as PNG files in the class-per-folder layout the `image_folder` source reads:

  OUT/train/<class>/<i>.png     OUT/eval/<class>/<i>.png     OUT/manifest.json

The class folder names are the number words ("zero" ... "nine"), so the positive text of every
sample is its class name, and a batch holds many copies of the same target, as in MMEB-train's
ImageNet-1K, N24News or VOC2007. The split is stratified by class and seeded; the 1,797 images are
distinct scans, so no image is in both splits (checked by content hash).

    python experiments/build_digits.py --out data/experiments/digits
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def to_png(image: np.ndarray, size: int) -> bytes:
    """An 8x8 digit with values 0..16 as an RGB PNG of size x size pixels, dark ink on white
    (as written on paper)."""
    from PIL import Image

    grey = (255 - np.clip(image, 0, 16) * (255 / 16)).astype(np.uint8)
    img = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def stratified_split(labels: list[int], eval_per_class: int, seed: int
                     ) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): `eval_per_class` of each class held out at random."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    train: list[int] = []
    held: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        if len(idx) <= eval_per_class:
            raise ValueError(f"class {y} has {len(idx)} images; cannot hold out {eval_per_class}")
        held += sorted(idx[:eval_per_class])
        train += sorted(idx[eval_per_class:])
    return train, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/experiments/digits"))
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--eval-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [int(y) for y in digits.target]
    train, held = stratified_split(labels, args.eval_per_class, args.seed)
    hashes: dict[str, set[str]] = {"train": set(), "eval": set()}
    for split, indices in (("train", train), ("eval", held)):
        for i in indices:
            png = to_png(digits.images[i], args.size)
            hashes[split].add(hashlib.sha256(digits.images[i].tobytes()).hexdigest())
            path = args.out / split / NAMES[labels[i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
    shared = hashes["train"] & hashes["eval"]
    if shared:  # identical scans in both splits would make the eval a memory test
        sys.exit(f"{len(shared)} identical images in train and eval")
    manifest = {
        "command": " ".join(sys.argv),
        "source": "sklearn.datasets.load_digits (UCI optdigits test set)",
        "size": args.size, "seed": args.seed,
        "train": len(train), "eval": len(held), "classes": list(NAMES),
        "distinct_train_images": len(hashes["train"]),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(train)} training and {len(held)} eval images under {args.out}")


if __name__ == "__main__":
    main()

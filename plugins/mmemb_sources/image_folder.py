"""`image_folder`: a classification tree (``root/<class>/<image>``) -> image -> label-text samples.

Each image becomes a sample whose query is the image (with `instruction`) and whose positive is
its class name as text (underscores become spaces, then `label_template` is applied: "a photo of
a {label}"). Hard negatives are other classes' labels: `negatives` of them chosen at random
(seeded per image), or ``negatives: all`` for every other class in a fixed order, which together
with ``kind: eval`` gives an MMEB-style classification eval set (each query ranked against all
class names). Images in sub-folders of a class folder belong to that class.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmemb.data.images import ImageError, read_image_file
from mmemb.data.schema import Item, Sample
from mmemb.data.sources import Record, Reject, Source, origin
from mmemb.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderConfig(BaseModel):
    """Arguments of `image_folder`."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="root folder with one sub-folder per class (--input)")
    instruction: str = Field(
        "Represent the given image for classification.", description="query instruction"
    )
    label_template: str = Field("{label}", description="label text, e.g. 'a photo of a {label}'")
    negatives: int | Literal["all"] = Field(
        0, description="other-class labels per sample as hard negatives, or 'all'"
    )
    seed: int = Field(0, description="seed for choosing negative labels and the sample order")
    shuffle: bool = Field(
        True,
        description="write samples in a seeded random order across classes (false: class by class)",
    )
    kind: Literal["train", "eval"] = Field("train", description="'eval' for an evaluation set")
    extensions: list[str] = Field(
        default_factory=lambda: list(IMAGE_SUFFIXES), description="image file suffixes to read"
    )


class ImageFolderSource(Source):
    """A class-per-folder image tree -> (image -> label text) samples."""

    example: ClassVar[str] = (
        "mmemb prepare --source image_folder --input flowers/train --out shards/flowers \\\n"
        "    --arg negatives=3 --arg label_template='a photo of a {label}'\n"
        "mmemb prepare --source image_folder --input flowers/val --out shards/flowers-eval \\\n"
        "    --arg negatives=all --arg kind=eval"
    )

    def __init__(self, config: ImageFolderConfig) -> None:
        self.config = config
        self.kind = config.kind  # type: ignore[misc]  # per instance: train or eval
        self.root = Path(config.input).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: no such folder (--input of image_folder is a folder "
                "with one sub-folder per class)."
            )
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"{self.root}: no class sub-folders (expected {self.root}/<class>/<image>)."
            )
        if "{label}" not in config.label_template:
            raise DataError(f"label_template {config.label_template!r} must contain '{{label}}'.")
        k = config.negatives
        if isinstance(k, int) and k > len(self.classes) - 1:
            raise DataError(
                f"negatives={k} but {self.root} has only {len(self.classes)} classes; "
                f"use at most {len(self.classes) - 1} or 'all'."
            )
        self.labels = {
            c: config.label_template.format(label=c.replace("_", " ")) for c in self.classes
        }

    def __iter__(self) -> Iterator[Record]:
        cfg = self.config
        suffixes = {s.lower() for s in cfg.extensions}
        dataset = self.root.name or "image_folder"
        files = [
            (cls, path)
            for cls in self.classes
            for path in sorted(
                p
                for p in (self.root / cls).rglob("*")
                if p.is_file() and p.suffix.lower() in suffixes
            )
        ]
        if cfg.shuffle:
            random.Random(f"image_folder-order:{cfg.seed}").shuffle(files)
        for cls, path in files:
            rel = path.relative_to(self.root).as_posix()
            try:
                data = read_image_file(path)
            except (ImageError, FileNotFoundError) as exc:
                yield Reject("corrupt_image", str(path), None, str(exc), rel)
                continue
            others = [c for c in self.classes if c != cls]
            if cfg.negatives == "all":
                chosen = others
            else:
                seed = hashlib.sha1(f"{cfg.seed}:{rel}".encode()).digest()
                chosen = random.Random(seed).sample(others, cfg.negatives)
            yield Sample(
                id=rel,
                dataset=dataset,
                query=Item(image=data, instruction=cfg.instruction),
                pos=Item(text=self.labels[cls]),
                negs=[Item(text=self.labels[c]) for c in chosen],
                meta={"origin": origin(path, None), "label": cls},
            )

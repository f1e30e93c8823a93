"""`mmeb_train` and `mmeb_eval`: the VLM2Vec / MMEB formats (jsonl or parquet).

MMEB-train rows (one file per subset, e.g. ``MMEB-train/CIRR/original-00000-of-00001.parquet``)::

    {"qry": "<|image_1|>\\nRetrieve an image ...", "qry_image_path": "images/CIRR/Train/x.png",
     "pos_text": "<|image_1|>\\nRepresent the given image.", "pos_image_path": "images/...",
     "neg_text": "...", "neg_image_path": "..."}          # negatives optional, str or list

MMEB-eval rows (each query with its own candidate list; the first candidate is the correct one)::

    {"qry_text": "<|image_1|>\\nRepresent the given image for classification",
     "qry_img_path": "ImageNet-1K/val/x.jpg",
     "tgt_text": ["tench", "goldfish", ...], "tgt_img_path": ["", "", ...]}

`<|image_N|>` markers are removed from the text (the item carries its image and the backbone's
processor places its own image tokens); a marker without an image path is a 'missing_field'
reject. The text is otherwise kept verbatim (instruction and content together, as VLM2Vec feeds
it), so ``instruction`` stays empty. Image paths are relative to `image_root` (``--image-root``;
default: the input file's folder). The dataset name comes from the file (``CIRR.parquet`` ->
CIRR; ``CIRR/original-00000-of-00001.parquet`` -> CIRR) unless ``--dataset-name`` is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from mmemb.data.schema import Item, Sample
from mmemb.data.sources import (
    ImageLoader,
    Record,
    Reject,
    Source,
    expand_inputs,
    origin,
    read_rows,
)
from mmemb_sources._common import FileSourceConfig, as_list, dataset_from_path, strip_placeholder

SUFFIXES = (".jsonl", ".json", ".parquet")


class MMEBTrainConfig(FileSourceConfig):
    """Arguments of `mmeb_train`."""


class MMEBEvalConfig(FileSourceConfig):
    """Arguments of `mmeb_eval`."""


def _first(row: dict[str, Any], *keys: str) -> tuple[str, Any]:
    """(the first of `keys` present in `row`, its value); ('', None) if none is."""
    for key in keys:
        if key in row:
            return key, row[key]
    return keys[0], None


def build_item(
    text: Any,
    image_path: Any,
    *,
    text_field: str,
    image_field: str,
    file: Path,
    line: int,
    sid: str,
    images: ImageLoader,
) -> Item | Reject:
    """One side of an MMEB row as an `Item`, or the reason it cannot be one."""
    if text is not None and not isinstance(text, str):
        return Reject(
            "missing_field",
            str(file),
            line,
            f"{text_field} is a {type(text).__name__}, not text",
            sid,
        )
    if image_path is not None and not isinstance(image_path, str):
        return Reject(
            "missing_field",
            str(file),
            line,
            f"{image_field} is a {type(image_path).__name__}, not a path",
            sid,
        )
    marker = False
    if text is not None:
        text, marker = strip_placeholder(text)
    path = image_path.strip() if isinstance(image_path, str) and image_path.strip() else None
    if marker and path is None:
        return Reject(
            "missing_field",
            str(file),
            line,
            f"{text_field} has an <|image_1|> marker but {image_field} is empty",
            sid,
        )
    image: bytes | None = None
    if path is not None:
        loaded = images.load(path, file=file, line=line, field=image_field, id=sid)
        if isinstance(loaded, Reject):
            return loaded
        image = loaded
    if text is not None and not text.strip():
        if image is None:
            return Reject(
                "empty_text",
                str(file),
                line,
                f"{text_field} is empty ({text!r}) and {image_field} names no image",
                sid,
            )
        text = None
    if text is None and image is None:
        return Reject(
            "missing_field",
            str(file),
            line,
            f"neither {text_field} nor {image_field} has a value",
            sid,
        )
    return Item(text=text, image=image)


class _MMEBBase(Source):
    def __init__(self, config: FileSourceConfig) -> None:
        self.config = config
        self.files = expand_inputs(config.input, SUFFIXES)
        self.root = Path(config.image_root).expanduser() if config.image_root else None

    def __iter__(self) -> Iterator[Record]:
        for path in self.files:
            dataset = dataset_from_path(path)
            images = ImageLoader(self.root, default_root=path.parent)
            for line, row in read_rows(path):
                if isinstance(row, Reject):
                    yield row
                    continue
                yield self.row(row, path=path, line=line, dataset=dataset, images=images)

    def row(
        self, row: dict[str, Any], *, path: Path, line: int, dataset: str, images: ImageLoader
    ) -> Record:
        raise NotImplementedError


class MMEBTrainSource(_MMEBBase):
    """VLM2Vec/MMEB-train rows -> training samples (query, positive, optional hard negatives)."""

    example: ClassVar[str] = (
        "mmemb prepare --source mmeb_train \\\n"
        "    --input MMEB-train/CIRR/original-00000-of-00001.parquet \\\n"
        "    --image-root MMEB-train --out shards/cirr --on-error skip"
    )

    def row(
        self, row: dict[str, Any], *, path: Path, line: int, dataset: str, images: ImageLoader
    ) -> Record:
        sid = f"{dataset}/{path.stem}:{line}"
        q_field, q_text = _first(row, "qry", "qry_text")
        qi_field, q_img = _first(row, "qry_image_path", "qry_img_path")
        p_field, p_text = _first(row, "pos_text")
        pi_field, p_img = _first(row, "pos_image_path", "pos_img_path")
        missing = [f for f, v in ((q_field, q_text), (p_field, p_text)) if v is None]
        if missing:
            return Reject(
                "missing_field",
                str(path),
                line,
                f"the row has no {' or '.join(missing)} (MMEB-train rows have qry, "
                f"qry_image_path, pos_text, pos_image_path and optionally neg_text, "
                f"neg_image_path; this row has {', '.join(sorted(row)) or 'nothing'})",
                sid,
            )
        kw: dict[str, Any] = {"file": path, "line": line, "sid": sid, "images": images}
        query = build_item(q_text, q_img, text_field=q_field, image_field=qi_field, **kw)
        if isinstance(query, Reject):
            return query
        pos = build_item(p_text, p_img, text_field=p_field, image_field=pi_field, **kw)
        if isinstance(pos, Reject):
            return pos
        n_field, n_texts = _first(row, "neg_text")
        ni_field, n_imgs = _first(row, "neg_image_path", "neg_img_path")
        texts, imgs = as_list(n_texts), as_list(n_imgs)
        negs: list[Item] = []
        for i in range(max(len(texts), len(imgs))):
            t = texts[i] if i < len(texts) else None
            im = imgs[i] if i < len(imgs) else None
            if (t is None or t == "") and (im is None or im == ""):
                continue  # an empty slot means "no negative" in VLM2Vec's files
            neg = build_item(
                t, im, text_field=f"{n_field}[{i}]", image_field=f"{ni_field}[{i}]", **kw
            )
            if isinstance(neg, Reject):
                return neg
            negs.append(neg)
        return Sample(
            id=sid,
            dataset=dataset,
            query=query,
            pos=pos,
            negs=negs,
            meta={"origin": origin(path, line)},
        )


class MMEBEvalSource(_MMEBBase):
    """MMEB-eval rows -> eval samples: the query and its own candidate list (first = correct)."""

    kind: ClassVar[Literal["train", "eval"]] = "eval"
    pool_images: ClassVar[bool] = True  # candidate lists share images across queries
    example: ClassVar[str] = (
        "mmemb prepare --source mmeb_eval \\\n"
        "    --input MMEB-eval/ImageNet-1K/test-00000-of-00001.parquet \\\n"
        "    --image-root MMEB-eval/eval_images --out shards/eval/imagenet-1k"
    )

    def row(
        self, row: dict[str, Any], *, path: Path, line: int, dataset: str, images: ImageLoader
    ) -> Record:
        sid = f"{dataset}/{path.stem}:{line}"
        q_field, q_text = _first(row, "qry_text", "qry")
        qi_field, q_img = _first(row, "qry_img_path", "qry_image_path")
        t_field, t_texts = _first(row, "tgt_text")
        ti_field, t_imgs = _first(row, "tgt_img_path", "tgt_image_path")
        if q_text is None and q_img is None:
            return Reject(
                "missing_field",
                str(path),
                line,
                f"the row has no {q_field} or {qi_field} (MMEB-eval rows have qry_text, "
                "qry_img_path, tgt_text, tgt_img_path)",
                sid,
            )
        texts, imgs = as_list(t_texts), as_list(t_imgs)
        if not texts and not imgs:
            return Reject(
                "missing_field",
                str(path),
                line,
                f"the row has no candidates ({t_field} and {ti_field} are empty)",
                sid,
            )
        if texts and imgs and len(texts) != len(imgs):
            return Reject(
                "missing_field",
                str(path),
                line,
                f"{t_field} has {len(texts)} candidates but {ti_field} has {len(imgs)}",
                sid,
            )
        kw: dict[str, Any] = {"file": path, "line": line, "sid": sid, "images": images}
        query = build_item(q_text, q_img, text_field=q_field, image_field=qi_field, **kw)
        if isinstance(query, Reject):
            return query
        candidates: list[Item] = []
        for i in range(max(len(texts), len(imgs))):
            t = texts[i] if texts else None
            im = imgs[i] if imgs else None
            cand = build_item(
                t, im, text_field=f"{t_field}[{i}]", image_field=f"{ti_field}[{i}]", **kw
            )
            if isinstance(cand, Reject):
                return cand
            candidates.append(cand)
        return Sample(
            id=sid,
            dataset=dataset,
            query=query,
            pos=candidates[0],
            negs=candidates[1:],
            meta={"origin": origin(path, line), "candidates": len(candidates)},
        )

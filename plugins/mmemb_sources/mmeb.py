"""`mmeb_train` and `mmeb_eval`: the VLM2Vec / MMEB formats (jsonl or parquet).

MMEB-train rows (one file per subset, e.g. ``MMEB-train/CIRR/original-00000-of-00001.parquet``)::

    {"qry": "<|image_1|>\\nRetrieve an image ...", "qry_image_path": "images/CIRR/Train/x.png",
     "pos_text": "<|image_1|>\\nRepresent the given image.", "pos_image_path": "images/...",
     "neg_text": "...", "neg_image_path": "..."}          # negatives optional, str or list

MMEB-eval rows (each query with its own candidate list; the first candidate is the correct one)::

    {"qry_text": "<|image_1|>\\nRepresent the given image for classification",
     "qry_img_path": "ImageNet-1K/val/x.jpg",
     "tgt_text": ["tench", "goldfish", ...], "tgt_img_path": ["", "", ...]}

MMEB-eval rows of VLM2Vec-v2 carry the instruction apart: ``qry_inst`` (and ``tgt_inst`` for
the candidates) beside ``qry_text``; it becomes the items' ``instruction``.

`<|image_N|>` markers are removed from texts and instructions (the item carries its image and the
backbone's processor places its own image tokens); a marker without an image path is a
'missing_field' reject. Nothing else of the text is changed -- whitespace around the marker
included -- so ``instruction`` stays empty for v1 rows (VLM2Vec feeds instruction and content as
one string).

Input: a file, a dataset folder or a glob. The hub keeps each dataset's variants side by side
(``MMEB-train/CIRR/{original,diverse_instruction,train}-00000-of-00001.parquet``, or
``ImageNet_1K/original/0000.parquet`` in its parquet conversion): `split` picks one (default: the
only one, else ``original`` for mmeb_train and ``test`` for mmeb_eval, else an error listing
them). The dataset name comes from that layout (``CIRR``, ``ImageNet_1K``; a lone ``CIRR.parquet``
-> CIRR) unless ``--dataset-name`` is given. Image paths are relative to `image_root`
(``--image-root``); its default is the folder above the dataset folder in the hub's layouts
(MMEB-train, whose ``images/`` the rows' ``images/CIRR/...`` paths start from) and the file's
folder for a lone file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mmemb.data.schema import Item, Sample
from mmemb.data.sources import ImageLoader, Record, Reject, Source, origin, read_rows
from mmemb_sources._common import (
    FileSourceConfig,
    InputFile,
    as_list,
    choose_split,
    find_inputs,
    remove_placeholder,
)

SUFFIXES = (".jsonl", ".json", ".parquet")


_SPLIT_HELP = (
    "which split of a dataset folder to read ({}: original, diverse_instruction, train); "
    "default: the only one, else '{}'"
)
_ROOT_HELP = (
    "directory relative image paths are resolved against (--image-root); default: the folder "
    "above the dataset folder (MMEB-train for MMEB-train/CIRR/original-00000-of-00001.parquet), "
    "or the file's folder for a lone file"
)


class MMEBTrainConfig(FileSourceConfig):
    """Arguments of `mmeb_train`."""

    image_root: str | None = Field(None, description=_ROOT_HELP)
    split: str | None = Field(None, description=_SPLIT_HELP.format("MMEB-train", "original"))


class MMEBEvalConfig(FileSourceConfig):
    """Arguments of `mmeb_eval`."""

    image_root: str | None = Field(None, description=_ROOT_HELP)
    split: str | None = Field(
        None, description="which split of a dataset folder to read; default: the only one, "
        "else 'test'"
    )


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
    instruction: Any = None,
    instruction_field: str = "",
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
    if instruction is not None and not isinstance(instruction, str):
        return Reject(
            "missing_field",
            str(file),
            line,
            f"{instruction_field} is a {type(instruction).__name__}, not text",
            sid,
        )
    marker = inst_marker = False
    if text is not None:
        text, marker = remove_placeholder(text)
    if instruction is not None:
        instruction, inst_marker = remove_placeholder(instruction)
    path = image_path.strip() if isinstance(image_path, str) and image_path.strip() else None
    if (marker or inst_marker) and path is None:
        return Reject(
            "missing_field",
            str(file),
            line,
            f"{text_field if marker else instruction_field} has an <|image_1|> marker but "
            f"{image_field} is empty",
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
    return Item(text=text, image=image, instruction=instruction or None)


class _MMEBBase(Source):
    default_split: ClassVar[str] = "original"

    def __init__(self, config: MMEBTrainConfig | MMEBEvalConfig) -> None:
        self.config = config
        found = find_inputs(config.input, SUFFIXES)
        self.files = choose_split(found, config.split, self.default_split, input=config.input)
        self.root = Path(config.image_root).expanduser() if config.image_root else None

    def __iter__(self) -> Iterator[Record]:
        for info in self.files:
            images = ImageLoader(self.root, default_root=info.root, default_why=info.root_why)
            for line, row in read_rows(info.path):
                if isinstance(row, Reject):
                    yield row
                    continue
                yield self.row(row, info=info, line=line, images=images)

    def row(self, row: dict[str, Any], *, info: InputFile, line: int,
            images: ImageLoader) -> Record:
        raise NotImplementedError


def _meta(info: InputFile, line: int, **extra: Any) -> dict[str, Any]:
    """A sample's meta: where it came from, and the split when the layout names one."""
    meta: dict[str, Any] = {"origin": origin(info.path, line), **extra}
    if info.split is not None:
        meta["split"] = info.split
    return meta


class MMEBTrainSource(_MMEBBase):
    """VLM2Vec/MMEB-train rows -> training samples (query, positive, optional hard negatives)."""

    example: ClassVar[str] = (
        "mmemb prepare --source mmeb_train \\\n"
        "    --input MMEB-train/CIRR/original-00000-of-00001.parquet \\\n"
        "    --image-root MMEB-train --out shards/cirr --on-error skip\n"
        "mmemb prepare --source mmeb_train --input MMEB-train/CIRR \\\n"
        "    --arg split=diverse_instruction --out shards/cirr-di"
    )

    def row(self, row: dict[str, Any], *, info: InputFile, line: int,
            images: ImageLoader) -> Record:
        path, sid = info.path, f"{info.dataset}/{info.id_stem}:{line}"
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
            dataset=info.dataset,
            query=query,
            pos=pos,
            negs=negs,
            meta=_meta(info, line),
        )


class MMEBEvalSource(_MMEBBase):
    """MMEB-eval rows -> eval samples: the query and its own candidate list (first = correct)."""

    kind: ClassVar[Literal["train", "eval"]] = "eval"
    pool_images: ClassVar[bool] = True  # candidate lists share images across queries
    default_split: ClassVar[str] = "test"
    example: ClassVar[str] = (
        "mmemb prepare --source mmeb_eval \\\n"
        "    --input MMEB-eval/ImageNet-1K/test-00000-of-00001.parquet \\\n"
        "    --image-root MMEB-eval/eval_images --out shards/eval/imagenet-1k"
    )

    def row(self, row: dict[str, Any], *, info: InputFile, line: int,
            images: ImageLoader) -> Record:
        path, sid = info.path, f"{info.dataset}/{info.id_stem}:{line}"
        q_field, q_text = _first(row, "qry_text", "qry")
        qi_field, q_img = _first(row, "qry_img_path", "qry_image_path")
        qn_field, q_inst = _first(row, "qry_inst")
        tn_field, t_inst = _first(row, "tgt_inst")
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
        query = build_item(
            q_text, q_img, text_field=q_field, image_field=qi_field,
            instruction=q_inst, instruction_field=qn_field, **kw,
        )
        if isinstance(query, Reject):
            return query
        candidates: list[Item] = []
        for i in range(max(len(texts), len(imgs))):
            t = texts[i] if texts else None
            im = imgs[i] if imgs else None
            cand = build_item(
                t, im, text_field=f"{t_field}[{i}]", image_field=f"{ti_field}[{i}]",
                instruction=t_inst, instruction_field=tn_field, **kw,
            )
            if isinstance(cand, Reject):
                return cand
            candidates.append(cand)
        return Sample(
            id=sid,
            dataset=info.dataset,
            query=query,
            pos=candidates[0],
            negs=candidates[1:],
            meta=_meta(info, line, candidates=len(candidates)),
        )

"""`jsonl`: a generic format, one sample per line::

    {"id": "q1",                                   # optional (default: file:line)
     "dataset": "my_set",                          # optional (default: --dataset-name / file name)
     "query": {"text": "a dog on a beach", "instruction": "Find an image for the caption."},
     "pos": {"image": "images/dog.jpg"},
     "neg": [{"image": "images/cat.jpg"}, "a plain-text negative"],
     "meta": {"anything": "json"}}                 # optional, kept in the sample

An item is a string (its text) or an object with any of ``text``, ``image`` (a path, relative to
``--image-root``, default the jsonl file's folder) and ``instruction``; ``neg`` (or ``negs``) is
one item or a list. Config ``query_instruction`` / ``target_instruction`` fill in instructions
that items do not set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from mmemb.data.schema import Item, Sample
from mmemb.data.sources import ImageLoader, Record, Reject, Source, expand_inputs, origin, read_rows
from mmemb_sources._common import FileSourceConfig, as_list, dataset_from_path


class JsonlConfig(FileSourceConfig):
    """Arguments of `jsonl`."""

    query_instruction: str | None = Field(None, description="instruction for queries without one")
    target_instruction: str | None = Field(
        None, description="instruction for positives/negatives without one"
    )


def parse_item(
    value: Any,
    *,
    field: str,
    file: Path,
    line: int,
    sid: str,
    images: ImageLoader,
    default_instruction: str | None,
) -> Item | Reject:
    """An item from a string or a {text, image, instruction} object."""
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        return Reject(
            "missing_field",
            str(file),
            line,
            f"'{field}' must be a string or an object with text/image/instruction, "
            f"got {type(value).__name__}",
            sid,
        )
    unknown = sorted(set(value) - {"text", "image", "instruction"})
    if unknown:
        return Reject(
            "missing_field",
            str(file),
            line,
            f"'{field}' has unknown key(s) {unknown}; an item has text, image and instruction",
            sid,
        )
    text, path, instruction = value.get("text"), value.get("image"), value.get("instruction")
    for key, v in (("text", text), ("image", path), ("instruction", instruction)):
        if v is not None and not isinstance(v, str):
            return Reject(
                "missing_field",
                str(file),
                line,
                f"'{field}.{key}' must be a string, got {type(v).__name__}",
                sid,
            )
    image: bytes | None = None
    if path is not None and path.strip():
        loaded = images.load(path, file=file, line=line, field=f"{field}.image", id=sid)
        if isinstance(loaded, Reject):
            return loaded
        image = loaded
    if text is None and image is None:
        return Reject(
            "missing_field", str(file), line, f"'{field}' has neither text nor image", sid
        )
    if text is not None and not text.strip() and image is None:
        return Reject("empty_text", str(file), line, f"'{field}.text' is empty ({text!r})", sid)
    return Item(text=text, image=image, instruction=instruction or default_instruction)


class JsonlSource(Source):
    """Generic jsonl rows {id?, dataset?, query, pos, neg?, meta?} -> samples."""

    example: ClassVar[str] = (
        "mmemb prepare --source jsonl --input pairs.jsonl --image-root images/ --out shards/pairs\n"
        "mmemb prepare --source jsonl --input 'data/*.jsonl' --out shards/mix \\\n"
        "    --arg query_instruction='Find an image for the caption.'"
    )

    def __init__(self, config: JsonlConfig) -> None:
        self.config = config
        self.files = expand_inputs(config.input, (".jsonl", ".json"))
        self.root = Path(config.image_root).expanduser() if config.image_root else None

    def __iter__(self) -> Iterator[Record]:
        cfg = self.config
        for path in self.files:
            default_ds = dataset_from_path(path)
            images = ImageLoader(self.root, default_root=path.parent)
            for line, row in read_rows(path):
                if isinstance(row, Reject):
                    yield row
                    continue
                yield self._row(row, path, line, default_ds, images, cfg)

    @staticmethod
    def _row(
        row: dict[str, Any],
        path: Path,
        line: int,
        default_ds: str,
        images: ImageLoader,
        cfg: JsonlConfig,
    ) -> Record:
        raw_id = row.get("id")
        sid = str(raw_id) if raw_id is not None and str(raw_id) else f"{path.stem}:{line}"
        missing = [k for k in ("query", "pos") if row.get(k) is None]
        if missing:
            return Reject(
                "missing_field",
                str(path),
                line,
                f"the row has no {' or '.join(missing)} (a row needs query and pos; "
                f"it has {', '.join(sorted(row)) or 'nothing'})",
                sid,
            )
        dataset = row.get("dataset")
        if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
            return Reject(
                "missing_field",
                str(path),
                line,
                f"'dataset' must be a non-empty string, got {dataset!r}",
                sid,
            )
        meta = row.get("meta") or {}
        if not isinstance(meta, dict):
            return Reject(
                "missing_field",
                str(path),
                line,
                f"'meta' must be an object, got {type(meta).__name__}",
                sid,
            )
        kw: dict[str, Any] = {"file": path, "line": line, "sid": sid, "images": images}
        query = parse_item(
            row["query"], field="query", default_instruction=cfg.query_instruction, **kw
        )
        if isinstance(query, Reject):
            return query
        pos = parse_item(row["pos"], field="pos", default_instruction=cfg.target_instruction, **kw)
        if isinstance(pos, Reject):
            return pos
        neg_key = "neg" if "neg" in row else "negs"
        negs: list[Item] = []
        for i, value in enumerate(as_list(row.get(neg_key))):
            neg = parse_item(
                value, field=f"{neg_key}[{i}]", default_instruction=cfg.target_instruction, **kw
            )
            if isinstance(neg, Reject):
                return neg
            negs.append(neg)
        return Sample(
            id=sid,
            dataset=dataset or default_ds,
            query=query,
            pos=pos,
            negs=negs,
            meta={**meta, "origin": origin(path, line)},
        )

"""One `Sample` <-> the tar members of one key: the sample's json and its image members.

WebDataset's convention names members ``{key}.{ext}`` (the key ends at the first dot of the last
path component); `split_key` is that rule, shared by the writer, the tar index and the readers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mmemb.data.images import image_ext
from mmemb.data.schema import Item, Sample
from mmemb.errors import DataError

if TYPE_CHECKING:  # only for the annotation: readers import this module, not the reverse
    from mmemb.data.shards.readers import ImagePool

# WebDataset's split of a member name into key and extension: the key ends at the first dot of
# the last path component.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str, str] | None:
    """('000001', 'q.jpg') for '000001.q.jpg'; None for a member without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def _item_json(item: Item, image_ref: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"text": item.text, "instruction": item.instruction}
    out.update(image_ref if item.image is not None else {"image": None})
    return out


def encode_sample(
    sample: Sample, *, pool: dict[str, bytes] | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The sample's json bytes and its image members ``[(ext, bytes)]``.

    With `pool` (a dict to fill), images are referenced by sha1 and put into `pool` instead of
    being returned as members.
    """
    members: list[tuple[str, bytes]] = []

    def ref(item: Item, role: str) -> dict[str, str]:
        if item.image is None:
            return {}
        if pool is not None:
            digest = hashlib.sha1(item.image).hexdigest()
            pool.setdefault(digest, item.image)
            return {"image_pool": digest}
        ext = f"{role}.{image_ext(item.image)}"
        members.append((ext, item.image))
        return {"image": ext}

    doc = {
        "id": sample.id,
        "dataset": sample.dataset,
        "query": _item_json(sample.query, ref(sample.query, "q")),
        "pos": _item_json(sample.pos, ref(sample.pos, "pos")),
        "negs": [_item_json(n, ref(n, f"neg{i}")) for i, n in enumerate(sample.negs)],
        "meta": sample.meta,
    }
    try:
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"sample {sample.id!r} ({sample.dataset}): its meta is not JSON-serialisable ({exc}). "
            "Sources must put only str/int/float/bool/None/list/dict values in `meta`."
        ) from exc
    return data, members


def _decode_item(d: Any, members: Mapping[str, bytes], pool: ImagePool | None, where: str) -> Item:
    if not isinstance(d, dict):
        raise DataError(f"{where}: an item must be a JSON object, got {type(d).__name__}")
    image: bytes | None = None
    if d.get("image") is not None:
        name = d["image"]
        if name not in members:
            raise DataError(f"{where}: the json names image member '{name}' but the shard has none")
        image = members[name]
    elif d.get("image_pool") is not None:
        if pool is None:
            raise DataError(
                f"{where}: the item references pooled image {d['image_pool']} but no pool shards "
                "were given. Read the prepared directory (with its manifest.json), not single "
                "shards."
            )
        image = pool.get(d["image_pool"], where=where)
    try:
        return Item(text=d.get("text"), image=image, instruction=d.get("instruction"))
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


def decode_sample(
    key: str, members: Mapping[str, bytes], *, where: str, pool: ImagePool | None = None
) -> Sample:
    """Rebuild a `Sample` from the members of one key (``{'json': ..., 'q.jpg': ...}``)."""
    if "json" not in members:
        raise DataError(
            f"{where}: sample '{key}' has no '{key}.json' member (got {sorted(members)})"
        )
    try:
        doc = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: sample '{key}': its json does not parse ({exc})") from exc
    try:
        return Sample(
            id=str(doc["id"]),
            dataset=str(doc["dataset"]),
            query=_decode_item(doc["query"], members, pool, f"{where} sample '{key}' query"),
            pos=_decode_item(doc["pos"], members, pool, f"{where} sample '{key}' pos"),
            negs=[
                _decode_item(n, members, pool, f"{where} sample '{key}' neg{i}")
                for i, n in enumerate(doc.get("negs") or [])
            ],
            meta=dict(doc.get("meta") or {}),
        )
    except KeyError as exc:
        raise DataError(f"{where}: sample '{key}': its json lacks the field {exc}") from exc

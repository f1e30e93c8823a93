"""Fingerprints of what determines an embedding, and the on-disk embedding cache keyed by them.

A dataset's embeddings depend on the model (every weight), the processor (tokenizer, image
processing, prompt templates), the pooler and normalisation, the precision it ran in, and the data
(every item's text, image and instruction, and the candidate lists). The **model fingerprint**
hashes the first group; the **data fingerprint** the second (from the shard manifest's checksums
when the data comes from shards, from the items themselves when it is in memory). A cache entry is
``<cache_dir>/<model fp>/<dataset>-<data fp>/`` holding:

- ``queries.npy``, ``targets.npy`` -- float32 embeddings of the distinct query and target items;
- ``structure.npz`` -- ``query_index``, ``cand_offsets``, ``cand_index`` (see `EncodedDataset`);
- ``meta.json`` -- both fingerprints in full, the counts, versions and the date; written last.

Entries are written to a temporary directory and renamed into place, so an interrupted eval leaves
either a complete entry or none; re-running skips every dataset that already has one. Batch size
and the number of ranks are deliberately not part of the key: they do not change what is computed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmemb.eval.dataset_embeddings import EncodedDataset
from mmemb.fileio import replace_dir

CACHE_FORMAT = 1
"""Bumped when the layout of an entry or the meaning of a fingerprint changes."""


def weights_hash(module: nn.Module) -> str:
    """sha256 over every state_dict tensor (name, dtype, shape, bytes), one tensor at a time.

    Hashing all weights (not a sample) is what makes a LoRA update or one fine-tuned layer change
    the key; tensors are copied to the CPU one by one so GPU models need no second full copy.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def processor_hash(processor: Any) -> str:
    """sha256 of the processor's type and the files its `save_pretrained` writes (tokenizer,
    image-processor and prompt settings): the processor's own description of its state."""
    h = hashlib.sha256(f"{type(processor).__module__}.{type(processor).__qualname__}\0".encode())
    with tempfile.TemporaryDirectory(prefix="mmemb-proc-") as tmp:
        processor.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(tmp)).encode() + b"\0")
                h.update(path.read_bytes())
    return h.hexdigest()


def describe_module(module: nn.Module) -> dict[str, Any]:
    """Class path, repr and plain settings (str/int/float/bool/None attributes) of a module.

    Poolers keep their choices (strategy, which token) in attributes rather than weights; those are
    what distinguish two poolers of the same class.
    """
    attrs = {
        k: v for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training"
        and (v is None or isinstance(v, (str, int, float, bool)))
    }
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "repr": repr(module),
        "settings": attrs,
    }


def encoder_fingerprint(encoder: nn.Module, *, precision: str) -> dict[str, Any]:
    """The model fingerprint of an `Encoder`: weights, processor, pooler, normalisation, precision.

    Returns the parts and their combined hash under ``"id"``.
    """
    backbone: nn.Module = encoder.backbone  # type: ignore[assignment]
    pooler: nn.Module = encoder.pooler  # type: ignore[assignment]
    parts: dict[str, Any] = {
        "weights": weights_hash(encoder),
        "processor": processor_hash(backbone.processor),
        "backbone": describe_module(backbone)["class"],
        "pooler": describe_module(pooler),
        "normalize": bool(getattr(encoder, "normalize", True)),
        "precision": precision,
    }
    parts["id"] = _hash_json({"format": CACHE_FORMAT, **parts})
    return parts


def manifest_fingerprint(manifest: Mapping[str, Any], dataset: str) -> str:
    """The data fingerprint of `dataset` in a prepared shard directory, from its manifest (which
    records every shard's sha256, the per-dataset counts and the schema version)."""
    return _hash_json({"format": CACHE_FORMAT, "dataset": dataset, "manifest": manifest})


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]


class EmbeddingCache:
    """Encoded datasets on disk under `root`, keyed by (model fp, dataset, data fp)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, model_fp: str, dataset: str, data_fp: str) -> Path:
        """The directory of one entry (it may not exist)."""
        return self.root / model_fp[:24] / f"{_safe(dataset)}-{data_fp[:24]}"

    def has(self, model_fp: str, dataset: str, data_fp: str) -> bool:
        """Whether a complete entry exists for these keys."""
        return self._meta(model_fp, dataset, data_fp) is not None

    def _meta(self, model_fp: str, dataset: str, data_fp: str) -> dict[str, Any] | None:
        meta_path = self.entry(model_fp, dataset, data_fp) / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: treat as absent and re-encode
        # Directory names hold prefixes only; the full keys must match too.
        if (meta.get("format") != CACHE_FORMAT or meta.get("model_fingerprint") != model_fp
                or meta.get("data_fingerprint") != data_fp or meta.get("dataset") != dataset):
            return None
        return dict(meta)

    def load(self, model_fp: str, dataset: str, data_fp: str) -> EncodedDataset | None:
        """The cached dataset (embeddings memory-mapped), or None on a miss."""
        if self._meta(model_fp, dataset, data_fp) is None:
            return None
        d = self.entry(model_fp, dataset, data_fp)
        try:
            structure = np.load(d / "structure.npz")
            return EncodedDataset(
                name=dataset,
                queries=np.load(d / "queries.npy", mmap_mode="r"),
                targets=np.load(d / "targets.npy", mmap_mode="r"),
                query_index=structure["query_index"],
                cand_offsets=structure["cand_offsets"],
                cand_index=structure["cand_index"],
            )
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is a miss; it is overwritten by the next save

    def save(
        self, model_fp: str, data_fp: str, encoded: EncodedDataset,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write an entry atomically (temporary directory, then rename); returns its directory."""
        final = self.entry(model_fp, encoded.name, data_fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            np.save(tmp / "queries.npy", np.asarray(encoded.queries, dtype=np.float32))
            np.save(tmp / "targets.npy", np.asarray(encoded.targets, dtype=np.float32))
            np.savez(
                tmp / "structure.npz", query_index=encoded.query_index,
                cand_offsets=encoded.cand_offsets, cand_index=encoded.cand_index,
            )
            meta = {
                "format": CACHE_FORMAT,
                "dataset": encoded.name,
                "model_fingerprint": model_fp,
                "data_fingerprint": data_fp,
                "counts": encoded.counts(),
                "dim": int(encoded.queries.shape[1]) if encoded.queries.ndim == 2 else 0,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **(dict(extra) if extra else {}),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            replace_dir(tmp, final)  # over a stale or damaged entry with the same keys
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

"""What `evaluate` reads, resolved before any encoding: the eval data (prepared shard directories
or in-memory samples) as one job per dataset, and the model argument as a `ModelSource`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmemb.data.schema import Sample
from mmemb.encoder_io import ModelSource
from mmemb.errors import ConfigError, DataError, UnknownComponentError
from mmemb.eval.cache import manifest_fingerprint

DataArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Iterable[Sample]]
"""Eval data: a prepared shard directory, a list of them, or ``{dataset name: samples}``."""


@dataclass
class DatasetJob:
    """One dataset to evaluate and where its samples come from."""

    name: str
    source: str
    fingerprint: str | None  # known before reading (from a manifest) or None (computed from items)
    samples: Callable[[], Iterable[Sample]]
    total: int | None


def _manifest_subset(manifest: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """What in a manifest determines one dataset's samples: its shards' checksums, the image pool
    it may reference, its counts and the schema version (not the command or dates)."""
    shards = [s for s in manifest.get("shards", []) if s.get("dataset") == dataset or s.get("pool")]
    return {
        "schema_version": manifest.get("schema_version"),
        "dataset": manifest.get("datasets", {}).get(dataset),
        "shards": [{k: s.get(k) for k in ("path", "sha256", "bytes", "pool")} for s in shards],
    }


def _identity(samples: list[Sample]) -> Iterable[Sample]:
    return samples


def dataset_jobs(data: DataArg, wanted: Sequence[str] | None) -> list[DatasetJob]:
    """One job per dataset of `data` (only those in `wanted` when given); fails on a dataset
    given twice, an unknown wanted name, a single shard file or no datasets at all."""
    jobs: list[DatasetJob] = []
    if isinstance(data, Mapping):
        for name, samples in data.items():
            materialised = list(samples)  # may be a one-shot iterator; read once, keep references
            jobs.append(DatasetJob(str(name), "<in-memory>", None,
                             functools.partial(_identity, materialised), len(materialised)))
    else:
        from mmemb.data.shards import MANIFEST_NAME, iter_samples, read_manifest

        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if not paths:
            raise ConfigError(["--data: no eval data given. Pass prepared shard directories "
                               "(`mmemb prepare --source mmeb_eval --out DIR`)."])
        for p in map(Path, paths):
            root = p.parent if p.name == MANIFEST_NAME else p
            if p.is_file() and p.name != MANIFEST_NAME:
                raise DataError(
                    f"--data {p}: a single shard file; pass the prepared directory that holds it "
                    "and its manifest.json (the manifest keys the cache and checks the counts)."
                )
            manifest = read_manifest(root)
            for name, stats in manifest.get("datasets", {}).items():
                total = stats.get("samples") if isinstance(stats, Mapping) else None
                jobs.append(DatasetJob(
                    name, str(root), manifest_fingerprint(_manifest_subset(manifest, name), name),
                    functools.partial(iter_samples, root, datasets=[name]), total,
                ))
    seen: dict[str, str] = {}
    for job in jobs:
        if job.name in seen:
            raise DataError(
                f"dataset {job.name!r} is in both {seen[job.name]} and {job.source}; results are "
                "per dataset name, so pass each dataset once (evaluate the two in separate runs, "
                "or prepare one under another name with `mmemb prepare --dataset-name`)"
            )
        seen[job.name] = job.source
    if wanted is not None:
        missing = [w for w in wanted if w not in seen]
        if missing:
            raise UnknownComponentError("dataset", missing[0], seen, where="--datasets")
        jobs = [j for j in jobs if j.name in set(wanted)]
    if not jobs:
        raise DataError("the eval data holds no datasets")
    return jobs


def resolve_model_dir(model: str | Path | ModelSource) -> ModelSource:
    """What `model` names (`mmemb.encoder_io.resolve_model`): a saved encoder directory or the
    training output directory holding one in ``model/``, a sentence-transformers model, or a
    Hugging Face model with --backbone/--pooler. Fails here, before any data is read."""
    from mmemb.encoder_io import resolve_model

    src = model if isinstance(model, ModelSource) else ModelSource(str(model))
    resolved = resolve_model(src)  # raises the error explaining what a model is
    return ModelSource(resolved.location, backbone=src.backbone, pooler=src.pooler,
                       args=src.args)

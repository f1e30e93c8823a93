"""`evaluate`: encode eval data with a model, score it with an eval task, write the report.

Per dataset: look the embeddings up in the cache (by model and data fingerprint); on a miss, stream
the samples, encode each distinct item once (each rank its share), gather on rank 0, store the
entry, and score it with the task. Rank 0 then summarises, adds reference scores and writes
``results.json`` and ``results.md``; every rank returns the same `EvalResults`.

Distributed: when a ``torch.distributed`` process group is initialised (the CLI starts a gloo group
when launched with WORLD_SIZE > 1), distinct items are split by index across ranks; only rank 0
touches the cache and the output directory. Without a process group the call is single-process.
Eval tasks are reached only through the ``eval_task`` registry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmemb import __version__, plugins
from mmemb.distributed import (
    broadcast_object,
    dist_env,
    group_active,
    init_distributed,
    on_rank0,
    pick_device,
    shutdown_distributed,
    sum_over_ranks,
)
from mmemb.encoder_io import ModelSource
from mmemb.errors import ConfigError, DataError, PluginError
from mmemb.eval.cache import EmbeddingCache, encoder_fingerprint
from mmemb.eval.dataset_embeddings import DatasetCollector, EncodedDataset, make_encode_fn
from mmemb.eval.inputs import DataArg, DatasetJob, dataset_jobs, resolve_model_dir
from mmemb.eval.results import EvalResults
from mmemb.eval.task import DatasetResult, EvalTask
from mmemb.model import Encoder
from mmemb.progress import Progress

Precision = Literal["auto", "fp32", "bf16"]
__all__ = ["DataArg", "Precision", "evaluate", "evaluate_path", "resolve_model_dir"]

_PROGRESS_EVERY = 64  # samples between progress-bar updates


# --- settings -----------------------------------------------------------------------------------


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError([f"precision: expected auto, fp32 or bf16 (got {precision!r})"])
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError([
            f"precision: bf16 needs a CUDA device (the model is on {device}); use fp32 on CPU"
        ])
    return precision


def _versions() -> dict[str, str]:
    def version(dist_name: str) -> str:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "mmemb": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# --- the run ------------------------------------------------------------------------------------


def _build_task(task: str, task_args: Mapping[str, Any] | None) -> EvalTask:
    built = plugins.build("eval_task", task, _where="--task", **dict(task_args or {}))
    if not isinstance(built, EvalTask):
        comp = plugins.get("eval_task", task)
        raise PluginError(
            f"eval task '{task}' from {comp.provider} does not implement the eval task protocol "
            "(name, primary_metric, metric_labels, describe, notes, score, summarize); see "
            "mmemb.eval.task.EvalTask"
        )
    return built


def evaluate(
    encoder: Encoder,
    data: DataArg,
    *,
    task: str = "mmeb",
    task_args: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    references: str | Path | None = None,
    show_progress: bool | None = None,
    datasets: Sequence[str] | None = None,
    precision: Precision = "auto",
    settings: Mapping[str, Any] | None = None,
    distributed: bool | None = None,
) -> EvalResults:
    """Evaluate `encoder` on `data` with eval task `task` (``mmeb`` or ``retrieval``).

    `data` is a prepared shard directory, a list of them (``mmemb prepare`` output), or a mapping
    ``{dataset name: iterable of Sample}`` (the key is the dataset name). `task_args` configure the
    task (e.g. ``{"ties": "miss"}``). With `out`, ``results.json`` and ``results.md`` are written
    there; with `cache_dir`, embeddings are cached and reused (see `mmemb.eval.cache`).
    `references` is a JSON file of published scores shown beside ours. `datasets` restricts the run
    to those datasets. `precision` "auto" means bf16 autocast on CUDA and fp32 on CPU.
    `show_progress` defaults to whether stderr is a terminal.

    `distributed`: None (default) shares the encoding over the ranks of the initialised process
    group, if any, and then *every rank must call* `evaluate` (it uses collectives); False runs on
    this process alone (e.g. from rank 0 only, inside a training job); True requires a group.
    """
    if batch_size < 1:
        raise ConfigError([f"batch_size: must be >= 1 (got {batch_size})"])
    if distributed is True and not group_active():
        raise ConfigError([
            "distributed=True: no torch.distributed process group is initialised; launch with "
            "torchrun (mmemb eval starts the group itself) or pass distributed=None"
        ])
    # Shared over the group's ranks unless told to run alone (or there is no group).
    env = dist_env() if distributed is not False and group_active() else None
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    task_obj = _build_task(task, task_args)
    jobs = dataset_jobs(data, datasets)
    device = next(encoder.parameters()).device
    prec = _resolve_precision(precision, device)
    refs_doc = _read_references(references, task_obj, jobs) if references is not None else None
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    show_progress = bool(show_progress) and rank == 0

    model_fp = encoder_fingerprint(encoder, precision=prec)
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    encode_fn = make_encode_fn(encoder, batch_size=batch_size, precision=prec)
    results: dict[str, DatasetResult] = {}
    data_fps: dict[str, str] = {}
    encoded_items = 0
    for job in jobs:
        result, fp, n_encoded = _run_job(
            job, task_obj, encode_fn, cache, model_fp, batch_size=batch_size, rank=rank,
            world=world, show_progress=show_progress,
        )
        data_fps[job.name] = fp
        encoded_items += n_encoded
        if result is not None:
            results[job.name] = result
            if show_progress:
                _log(f"{job.name}: {_fmt_result(task_obj, result)}")

    run_settings = {
        "batch_size": batch_size, "world_size": world, "precision": prec, "device": str(device),
        "data": sorted({j.source for j in jobs}),
        "cache_dir": str(cache_dir) if cache_dir else None,
        "items_encoded": sum_over_ranks(encoded_items, world), **dict(settings or {}),
    }

    def finish() -> EvalResults:
        summary = task_obj.summarize(results)
        res = EvalResults(
            task=task_obj.name,
            primary_metric=task_obj.primary_metric,
            metric_labels=dict(task_obj.metric_labels),
            datasets=results,
            groups=summary.groups,
            overall=summary.overall,
            ungrouped=summary.ungrouped,
            task_config=task_obj.describe(),
            fingerprint={
                "model": model_fp, "data": data_fps,
                "id": hashlib.sha256(
                    json.dumps([model_fp["id"], data_fps], sort_keys=True).encode()
                ).hexdigest(),
            },
            versions=_versions(),
            settings=run_settings,
            notes=task_obj.notes(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        if refs_doc is not None:
            from mmemb.eval.report import known_names, parse_references

            res.references = parse_references(refs_doc, known_names(res), where=str(references))
        if out is not None:
            res.save(out)
        return res

    final = on_rank0(finish, rank, world)
    final = broadcast_object(final, world)
    assert final is not None
    # Each rank's own share, beside the total over ranks.
    final.settings = {**final.settings, "items_encoded_this_rank": encoded_items}
    return final


def _read_references(path: str | Path, task: EvalTask, jobs: Sequence[DatasetJob]) -> Any:
    """Read and check the reference file before any encoding (a typo must not cost an eval run)."""
    from mmemb.eval.report import load_references_doc, parse_references

    doc = load_references_doc(path)
    names = [j.name for j in jobs]
    for g in task.summarize({}).groups:
        names += [g.name, *g.datasets]
    parse_references(doc, {_norm(n): n for n in names}, where=str(path))
    return doc


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _run_job(
    job: DatasetJob, task: EvalTask, encode_fn: Callable[..., np.ndarray],
    cache: EmbeddingCache | None, model_fp: Mapping[str, Any], *, batch_size: int, rank: int,
    world: int, show_progress: bool,
) -> tuple[DatasetResult | None, str, int]:
    """One dataset: (result on rank 0, None elsewhere; data fingerprint; items encoded)."""
    model_id = str(model_fp["id"])
    collector: DatasetCollector | None = None
    fp = job.fingerprint
    if fp is None:
        # In-memory data has no manifest: read it once (cheap), fingerprint its items, then decide.
        collector = DatasetCollector(job.name, encode_fn, batch_size=batch_size, rank=rank,
                                     world=world, stream=False)
        _feed(collector, job, show_progress=False)
        fp = collector.fingerprint()
    data_fp = fp

    def lookup() -> EncodedDataset | None:
        return cache.load(model_id, job.name, data_fp) if cache is not None else None

    cached = on_rank0(lookup, rank, world) if cache is not None else None
    hit = broadcast_object(cached is not None, world)
    if hit:
        def score_cached() -> DatasetResult:
            assert cached is not None
            return _score(task, cached, data_fp, cached=True)

        return on_rank0(score_cached, rank, world), data_fp, 0

    if collector is None:
        collector = DatasetCollector(job.name, encode_fn, batch_size=batch_size, rank=rank,
                                     world=world, stream=True)
        _feed(collector, job, show_progress=show_progress)
    else:
        total = collector.pending_items
        with Progress(total, desc=f"encode {job.name}", log_every=max(1, total // 10),
                      enabled=show_progress) as bar:
            collector.encode_pending(progress=bar.update)
    encoded = collector.finish()  # a collective: every rank sends its rows to rank 0

    def store_and_score() -> DatasetResult:
        assert encoded is not None
        if cache is not None:
            cache.save(model_id, data_fp, encoded, extra={"source": job.source, "model": model_fp})
        return _score(task, encoded, data_fp, cached=False)

    return on_rank0(store_and_score, rank, world), data_fp, collector.encoded_items


def _feed(collector: DatasetCollector, job: DatasetJob, *, show_progress: bool) -> None:
    """Stream the job's samples into the collector (encoding as batches fill when streaming)."""
    with Progress(job.total or 0, desc=f"encode {job.name}", enabled=show_progress) as bar:
        pending = 0
        for sample in job.samples():
            if sample.dataset != job.name and job.fingerprint is not None:
                raise DataError(
                    f"{job.source}: a shard of dataset {job.name!r} holds sample {sample.id!r} of "
                    f"dataset {sample.dataset!r}; the directory is inconsistent, re-run "
                    "`mmemb prepare`"
                )
            collector.add(sample)
            pending += 1
            if pending == _PROGRESS_EVERY:
                bar.update(pending)
                pending = 0
        if pending:
            bar.update(pending)
    if job.total is not None and collector.n_samples != job.total:
        raise DataError(
            f"{job.source}: the manifest lists {job.total} samples of {job.name!r} but the shards "
            f"hold {collector.n_samples}; the directory is incomplete or damaged, re-run "
            "`mmemb prepare`"
        )


def _score(task: EvalTask, encoded: EncodedDataset, data_fp: str, *, cached: bool) -> DatasetResult:
    result = task.score(encoded)
    result.data_fingerprint = data_fp
    result.cached = cached
    return result


def _fmt_result(task: EvalTask, result: DatasetResult) -> str:
    parts = [f"{task.metric_labels.get(k, k)} {v:.1f}" for k, v in result.metrics.items()]
    return ", ".join(parts) + (" (cached)" if result.cached else "")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- from a model directory -------------------------------------------------------------------


def evaluate_path(
    model: str | Path | ModelSource,
    data: DataArg,
    *,
    device: str | None = None,
    precision: Precision = "auto",
    **kwargs: Any,
) -> EvalResults:
    """Load the encoder saved at `model` (or `model`/model) and `evaluate` it.

    Under a launcher (WORLD_SIZE > 1, as torchrun sets) a gloo process group is started when none
    exists, each rank encodes its share on its device (``cuda:LOCAL_RANK`` when CUDA is there), and
    the group is shut down afterwards. On CUDA with precision "auto"/"bf16" the weights are cast to
    bfloat16, as the reference implementation evaluates.
    """
    from mmemb.encoder_io import load_encoder

    path = resolve_model_dir(model)
    env = dist_env()
    # Eval only gathers embeddings and small objects between ranks: gloo is enough on any device.
    started = init_distributed(env, torch.device("cpu"))
    try:
        dev = pick_device(device, env)
        prec = _resolve_precision(precision, dev)
        encoder = load_encoder(path)
        encoder.to(dev)
        if prec == "bf16":
            encoder.to(torch.bfloat16)
        settings = {"model": str(path), **dict(kwargs.pop("settings", None) or {})}
        return evaluate(encoder, data, precision=prec, settings=settings, **kwargs)  # type: ignore[arg-type]
    finally:
        shutdown_distributed(started)

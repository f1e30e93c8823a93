"""Small real training set-ups for tests and benchmarks: the tiny LLaVA-OneVision model on a few
synthetic samples, and a worker launcher for multi-process runs on the CPU (gloo)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmemb.distributed import free_port
from mmemb.recipe import LoadedRecipe, load_recipe


def prepare_synthetic(out: Path, *, n: int, negatives: int, seed: int = 1,
                      shard_size: int = 16, tasks: Sequence[str] | None = None) -> Path:
    """Synthetic coloured-shape samples prepared into `out` (once; reused when present);
    `tasks` restricts them to e.g. ``["i2t"]`` (every query an image)."""
    from mmemb.data.prepare import prepare

    args: dict[str, Any] = {"n": n, "seed": seed, "negatives": negatives}
    if tasks is not None:
        args["tasks"] = list(tasks)
    if not (out / "manifest.json").is_file():
        prepare("synthetic", args, out, shard_size=shard_size)
    return out


def tiny_recipe(
    model_dir: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    eval_dir: str | Path | None = None,
    check: bool = True,
    **train: Any,
) -> LoadedRecipe:
    """A recipe training the tiny LLaVA-OneVision at `model_dir` (random init) on `data_dir`;
    `train` entries update the `train` section, `overrides` are applied as on the command line;
    `check=False` skips the component and path checks (for set-ups that never read the data)."""
    raw: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {
            "train": [{"shards": str(data_dir)}],
            "eval": [{"shards": str(eval_dir)}] if eval_dir else [],
            "shuffle_buffer": 32,
        },
        "model": {
            "backbone": {"name": "llava_onevision", "path": str(model_dir), "init": "random"},
            "pooler": "last_token",
        },
        "loss": {"temperature": 0.05, "reweighter": {"name": "ega", "alpha": 1.0}},
        "train": {"steps": 10, "batch_size": 4, "negatives": 1, "lr": 1e-3, "warmup_steps": 2,
                  "log_every": 100, "tensorboard": False, **train},
        "eval": {"before_training": False, "batch_size": 16},
    }
    return load_recipe(raw=raw, overrides=list(overrides), check_components=check)


def run_workers(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes with the environment
    torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); raises if one fails."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_worker, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., None],
            args: tuple[Any, ...]) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, world_size, *args)
    # `fn` finished and wrote its results. Skip the interpreter's teardown: with gloo (and a DDP
    # reducer still referenced by `fn`'s frames) it occasionally aborts in a C++ thread destructor
    # ("terminate called without an active exception", SIGABRT) after all the work is done, which
    # failed CI runs of correct tests. An exception in `fn` still propagates as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

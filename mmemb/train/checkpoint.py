"""Checkpoints: atomic, keep-last-K, and everything an exact resume needs.

Layout of ``OUTPUT_DIR/checkpoints/step-00000500/``::

    model.safetensors       trainable weights (the LoRA adapter, or the unfrozen model)  [torch]
    optimizer.pt scheduler.pt                                                            [torch]
    deepspeed/              the DeepSpeed engine's own checkpoint (ZeRO partitions)   [deepspeed]
    rng/rank-00000.pt       Python, NumPy and torch (CPU, CUDA) generator states of each rank
    data/rank-00000.json    each rank's data-stream position (`TrainStream.state_dict()`)
    trainer_state.json      step, world size, engine, last metrics
    recipe.yaml             the resolved recipe

A checkpoint is written into ``.tmp-step-…`` and renamed when complete, so a directory named
``step-…`` is always whole: a job killed mid-write leaves only a temp directory, removed next time.
Every rank writes its own files (a shared filesystem is assumed, as on any cluster); rank 0 renames.
Loading uses safetensors and ``torch.load(weights_only=True)``: no pickled code is ever run.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmemb.distributed import DistEnv, barrier
from mmemb.errors import MmembError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(MmembError):
    """A checkpoint to resume from is missing, incomplete or from another setup."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(spec: str, output_dir: str | Path) -> Path | None:
    """`--resume latest` (None when there is none yet: a fresh start) or a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {spec}: not a complete mmemb checkpoint ({STATE_FILE} is missing). Pass a "
            f"directory such as {checkpoint_root(output_dir)}/step-00000100, or 'latest'."
        )
    return path


# -- RNG ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from, as tensors and numbers (loadable with weights_only)."""
    np_state: Any = np.random.get_state()  # the legacy tuple form
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         int(has_gauss), float(gauss))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving -------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path,
    step: int,
    env: DistEnv,
    *,
    engine: Any,
    data_state: dict[str, Any],
    trainer_state: dict[str, Any],
    recipe_yaml: str,
    keep_last: int,
) -> Path:
    """Write the checkpoint of `step` atomically (all ranks call this); returns its path."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a job killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "data").mkdir()
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank-{env.rank:05d}.pt")
    (tmp / "data" / f"rank-{env.rank:05d}.json").write_text(json.dumps(data_state))
    barrier()
    if env.is_main:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        state = {"step": step, "world_size": env.world_size, **trainer_state}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():  # the same step saved again (e.g. preempted right after a save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# -- loading ------------------------------------------------------------------------------------


def read_trainer_state(path: Path, env: DistEnv) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("world_size") != env.world_size:
        raise CheckpointError(
            f"{path} was written by {state.get('world_size')} process(es); this run has "
            f"{env.world_size}. Resume with the same number of processes (the data position and "
            "RNG states are per rank)."
        )
    return dict(state)


def load_rank_state(path: Path, env: DistEnv) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RNG state, data-stream state) this rank saved."""
    rng_file = path / "rng" / f"rank-{env.rank:05d}.pt"
    data_file = path / "data" / f"rank-{env.rank:05d}.json"
    for f in (rng_file, data_file):
        if not f.is_file():
            raise CheckpointError(f"{path}: {f.relative_to(path)} is missing; the checkpoint is "
                                  "incomplete. Resume from an earlier one.")
    rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    return rng, json.loads(data_file.read_text())

"""Checkpoints: atomic, keep-last-K, and everything an exact resume needs.

Layout of ``OUTPUT_DIR/checkpoints/step-00000500/``::

    model.safetensors       trainable weights (the LoRA adapter, or the unfrozen model)  [torch]
    optimizer.pt scheduler.pt                                                            [torch]
    deepspeed/              the DeepSpeed engine's own checkpoint (ZeRO partitions)   [deepspeed]
    rng/rank-00000.pt       Python, NumPy and torch (CPU, CUDA) generator states of each rank
    data/rank-00000.json    each rank's data-stream position (`TrainStream.state_dict()`)
    trainer_state.json      step, world size, engine, last metrics
    recipe.yaml             the resolved recipe

A checkpoint is written into ``.tmp-step-…``, flushed to disk, and renamed when complete, so a
directory named ``step-…`` is always whole: a job killed mid-write (even by SIGKILL) leaves only a
temp directory, removed next time. A write that fails (disk full, quota, file-size limit) removes
its temp directory and raises `CheckpointError`; the previous checkpoints are untouched. Old
checkpoints are dropped by renaming them to ``.trash-…`` first, so a half-deleted one never looks
complete. Every rank writes its own files (a shared filesystem is assumed, as on any cluster);
rank 0 renames. Loading uses safetensors and ``torch.load(weights_only=True)``: no pickled code is
ever run.

`trainer_state.json` also records the run's lineage (``run_id``) and recipe fingerprint, which
`mmemb.train.rundir` checks before resuming.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmemb.distributed import DistEnv, barrier
from mmemb.errors import MmembError
from mmemb.fileio import remove_dir, replace_dir

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(MmembError):
    """A checkpoint to resume from is missing, incomplete or from another setup."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory named ``step-NNNNNNNN``."""
    m = _NAME.match(path.name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step-NNNNNNNN).")
    return int(m.group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (named ``step-…`` and holding the state file, which is
    written last), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `trainer_state.json` (step, world size, run_id, fingerprint, metrics)."""
    try:
        return dict(json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a complete mmemb checkpoint ({STATE_FILE}: {exc}). Pass a directory "
            "such as OUTPUT_DIR/checkpoints/step-00000100, or --resume auto."
        ) from None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: renamed out of the ``step-…`` namespace first (atomic), so a deletion
    cut short never leaves a partial directory that looks like a checkpoint."""
    remove_dir(path, trash=path.with_name(f".trash-{path.name}"))


def _fsync_tree(path: Path) -> None:
    """Flush every file of `path` and the directories themselves: a rename must not reach the disk
    before the data it publishes (a node crash would otherwise leave an empty 'complete' one)."""
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


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


def sweep_stale(root: Path) -> None:
    """Clear what a job killed while writing left under `root`: half-written ``.tmp-step-*``
    directories go; a ``.trash-step-N`` goes too, unless ``step-N`` is missing — killed between
    the two renames of a re-save, that old copy is the only one, and it is put back."""
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for trash in root.glob(".trash-step-*"):
        whole = root / trash.name.removeprefix(".trash-")
        if not whole.exists() and (trash / STATE_FILE).is_file():
            os.replace(trash, whole)
        else:
            shutil.rmtree(trash, ignore_errors=True)


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
    run_id: str | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically (all ranks call this); returns its path.

    Then keeps the newest `keep_last` checkpoints up to `step` of lineage `run_id` (None: every
    checkpoint counts), and never deletes one newer than `step`: resuming from an older one never
    silently drops the newer ones. Raises `CheckpointError` if any rank fails to write (the
    temp directory is removed, every earlier checkpoint is untouched)."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    error: BaseException | None = None
    try:
        if env.is_main:
            root.mkdir(parents=True, exist_ok=True)
            sweep_stale(root)
            (tmp / "rng").mkdir(parents=True)
            (tmp / "data").mkdir()
    except Exception as exc:  # noqa: BLE001 - reported below, after every rank agreed
        error = exc
    _agree(error, env, tmp, final)
    try:
        engine.save(tmp)
        torch.save(rng_state(), tmp / "rng" / f"rank-{env.rank:05d}.pt")
        (tmp / "data" / f"rank-{env.rank:05d}.json").write_text(json.dumps(data_state))
    except Exception as exc:  # noqa: BLE001
        error = exc
    except BaseException:  # a second Ctrl-C: no half-written directory stays behind
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _agree(error, env, tmp, final)
    try:
        if env.is_main:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
            state = {"step": step, "world_size": env.world_size, "run_id": run_id,
                     **trainer_state}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks it whole
            _fsync_tree(tmp)
            # the same step saved again: the old one is renamed to a .trash- name first; the
            # sweep above removes it, or restores it if a crash left no step- directory
            replace_dir(tmp, final, old=final.with_name(f".trash-{final.name}"))
            _fsync_dir(root)
    except Exception as exc:  # noqa: BLE001
        error = exc
    _agree(error, env, tmp, final)
    if env.is_main:
        mine = [p for p in list_checkpoints(root) if checkpoint_step(p) <= step
                and (run_id is None or read_state(p).get("run_id") in (run_id, None))]
        for old_ckpt in mine[:-keep_last]:
            remove_checkpoint(old_ckpt)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree(error: BaseException | None, env: DistEnv, tmp: Path, final: Path) -> None:
    """A barrier that also tells every rank whether any rank failed (a plain barrier would leave
    the others waiting forever); on failure the temp directory goes and all ranks raise."""
    failed = error is not None
    if env.world_size > 1 and dist.is_initialized():
        flag = torch.tensor([float(failed)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag)
        failed = bool(flag.item() > 0)
    if not failed:
        return
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    earlier = [p.name for p in list_checkpoints(final.parent) if p != final]
    kept = (f"the previous checkpoint {final.parent / earlier[-1]} is intact"
            if earlier else "no earlier checkpoint exists")
    reason = f"{type(error).__name__}: {error}" if error is not None else "another rank failed"
    raise CheckpointError(
        f"could not write checkpoint {final} ({reason}); {kept}. Free disk space or raise the "
        "quota/file-size limit, then rerun the same command with --resume auto."
    ) from error


# -- loading ------------------------------------------------------------------------------------


def read_trainer_state(path: Path, env: DistEnv) -> dict[str, Any]:
    state = read_state(path)
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

"""Ranks from the launcher's environment (torchrun, the deepspeed launcher, or SLURM's srun)."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """torchrun/deepspeed set RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_PROCID/NTASKS/LOCALID."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        rank, world, local = 0, 1, 0
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Start the process group when there is more than one rank; True if this call started it."""
    if env.world_size <= 1 or dist.is_initialized():
        return False
    # srun does not set the rendezvous variables torchrun sets; the first node's name works.
    os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return True


def shutdown_distributed(started: bool) -> None:
    """Barrier then destroy: without both, gloo processes sometimes crash at interpreter exit."""
    if started and dist.is_initialized():
        dist.barrier()
        destroy_process_group()


def destroy_process_group() -> None:
    """Destroy the default group. When DeepSpeed wrapped it, through DeepSpeed, which then drops
    the groups it cached (a later run in the same process would otherwise use dead groups)."""
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (a MASTER_PORT for a run without a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _slurm_master_addr() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    # "gpu[01-04],cpu7" -> "gpu01"; good enough for the usual bracket form.
    first = nodes.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def pick_device(requested: str | None, env: DistEnv) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")

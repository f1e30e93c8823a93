"""Everything about ranks: who this process is (from the process group or the launcher's
environment: torchrun, the deepspeed launcher or SLURM's srun), starting and ending the process
group, and the collectives the kernel uses (object broadcast, sums, rank-0 work, row gathers)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mmemb.errors import MmembError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """This process's rank, world size and local rank -- the one place they are read.

    Rank and world size are the initialised process group's when there is one (whoever started
    it), else the launcher's: torchrun/deepspeed set RANK/WORLD_SIZE/LOCAL_RANK; srun sets
    SLURM_PROCID/NTASKS/LOCALID. The local rank always comes from the environment.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        rank, world, local = 0, 1, 0
    if group_active():  # the group is the truth once it exists (e.g. started with explicit ranks)
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def group_active() -> bool:
    """Whether a default torch.distributed process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


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


# --- collectives over the default group; `world` == 1 means this process alone (no group calls) --


def broadcast_object(value: T, world: int) -> T:
    """Rank 0's `value` on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(value: int, world: int) -> int:
    """The sum of every rank's `value`, on every rank."""
    if world == 1:
        return value
    values: list[int] = [0] * world
    dist.all_gather_object(values, value)
    return sum(values)


def on_rank0(fn: Callable[[], T], rank: int, world: int) -> T | None:
    """Run `fn` on rank 0 and tell every rank whether it failed, so an error there (a bad reference
    file, a full disk) stops all ranks instead of leaving the others waiting in a collective.
    Returns `fn`'s value on rank 0 and None elsewhere."""
    value: T | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            value = fn()
        except BaseException as exc:  # re-raised below, after the other ranks have been told
            error = exc
    failed = broadcast_object(
        None if error is None else (isinstance(error, MmembError), str(error)), world
    )
    if error is not None:
        raise error
    if failed is not None:
        user_error, message = failed
        raise (MmembError if user_error else RuntimeError)(f"rank 0 failed: {message}")
    return value


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


def all_gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` (n_r, …) of every rank along dim 0; the result keeps the gradient.

    Ranks may hold different numbers of rows (the rows are padded for the collective and the
    padding dropped). In the backward, each rank's shard receives the sum over ranks of the
    gradients of its rows (all_gather's backward is a reduce-scatter). Returns the concatenation
    and the list of row counts per rank.
    """
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n, group=group)
    sizes = [int(s.item()) for s in sizes_t]
    most = max(sizes)
    padded = x
    if x.shape[0] < most:
        pad = x.new_zeros((most - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    parts = _AllGather.apply(padded.contiguous(), group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0), sizes


class _AllGather(torch.autograd.Function):
    """all_gather with a backward: each rank's input gets the sum over ranks of the gradients of
    its part (an all-reduce of the stacked gradients, then this rank's slice: gloo has no
    reduce-scatter). torch's own `torch.distributed.nn.all_gather` is deprecated."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None
    ) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` (n_r, …) of every rank along dim 0, without gradient (e.g. the content
    keys that travel with gathered candidates). Ranks may hold different numbers of rows."""
    with torch.no_grad():
        return all_gather_with_grad(x.detach(), group)[0]

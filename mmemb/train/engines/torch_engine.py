"""The plain PyTorch engine: one process, or `DistributedDataParallel` across ranks (gloo on the
CPU, nccl on GPUs).

Under DDP each step makes one synchronised forward per backward, as DDP expects:

- without GradCache both sides are encoded in a single call of the wrapped module
  (`forward_pair`), so one forward is followed by the step's one backward;
- with GradCache every re-run chunk is a forward and its backward; all but the last run with
  gradient synchronisation off (DDP's ``no_sync``), so the gradients accumulate locally and are
  averaged once, overlapping the last chunk's backward.

``find_unused_parameters`` is on: some layers are never used (e.g. the vision layers after the
feature layer LLaVA reads) and a frozen tower is skipped by batches without its modality. DDP
counts a parameter as used if any chunk of the step used it on any rank, including chunks run
under ``no_sync`` (pytorch/pytorch#124193, in torch >= 2.4), so the averaged gradients are the
full-batch ones; the backbones also run every trainable tower in every training chunk
(`mmemb_hf.uniform.needs_placeholder`), so the used set does not vary between chunks anyway.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from mmemb.errors import MmembError
from mmemb.train.engines.base import Engine, EngineSetup
from mmemb.train.optim import build_optimizer, build_scheduler

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


class CheckpointMismatchError(MmembError):
    """A checkpoint does not fit the model the recipe builds."""


def trainable_named(encoder: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in encoder.named_parameters() if p.requires_grad}


def load_trainable(encoder: torch.nn.Module, path: Path) -> None:
    """Copy weights saved by `save_file(trainable_state)` into the encoder's trainable params."""
    saved = load_file(str(path))
    params = trainable_named(encoder)
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint's trainable weights do not match the model the recipe "
            f"builds (missing {missing[:3]}, unexpected {extra[:3]}). Resume with the recipe the "
            "checkpoint was written with (its recipe.yaml)."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def _no_buffer_sync() -> dict[str, Any]:
    """Every rank builds the same model from the same seed and its buffers are constants: no
    broadcast before each forward (torch >= 2.13 spells it `forward_sync_buffers`)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class EncodeSides(torch.nn.Module):
    """Encodes several batches in one call: under DDP, one forward for the step's one backward."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *batches: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder(b) for b in batches)


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        cfg = setup.loaded.recipe.train
        self.cfg = cfg
        self.params = list(self.trainable_parameters())
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self._precision = cfg.precision
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        )
        self.model: torch.nn.Module = EncodeSides(self.encoder)
        self.ddp: DistributedDataParallel | None = None
        if self.env.world_size > 1 and dist.is_initialized():
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
                **_no_buffer_sync(),
            )
            self.model = self.ddp

    @property
    def precision(self) -> str:
        return self._precision

    def autocast(self) -> AbstractContextManager[object]:
        if self._precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self._precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode(self, batches: tuple[Mapping[str, torch.Tensor], ...],
                sync: bool) -> tuple[torch.Tensor, ...]:
        # DDP decides at the forward whether the following backward exchanges gradients.
        quiet = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
        with quiet, self.autocast():
            return tuple(e.float() for e in self.model(*batches))

    def forward(self, inputs: Mapping[str, torch.Tensor], *, sync: bool = True) -> torch.Tensor:
        return self._encode((inputs,), sync)[0]

    def forward_pair(self, query: Mapping[str, torch.Tensor],
                     candidates: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q, c = self._encode((query, candidates), True)
        return q, c

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in trainable_named(self.encoder).items()}

    def save(self, directory: Path) -> None:
        # Every rank holds the same weights and optimizer state: rank 0 writes them.
        if not self.env.is_main:
            return
        save_file(self.trainable_state(), str(directory / WEIGHTS_FILE))
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        sched = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            sched["scaler"] = self.scaler.state_dict()
        torch.save(sched, directory / SCHEDULER_FILE)

    def load(self, directory: Path) -> None:
        load_trainable(self.encoder, directory / WEIGHTS_FILE)
        # weights_only: a checkpoint is data, never code.
        opt = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt)
        sched = torch.load(directory / SCHEDULER_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.scaler is not None and "scaler" in sched:
            self.scaler.load_state_dict(sched["scaler"])

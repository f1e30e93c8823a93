"""The plain PyTorch engine: one process, or data parallel across ranks (gloo on CPU, nccl on GPU).

Across ranks the gradients are averaged once per step, after the whole backward (one flat
all-reduce), which is what DDP computes. Doing it by hand instead of wrapping the encoder in
`DistributedDataParallel` keeps three things simple that DDP makes fragile: several forwards before
one backward (queries and candidates), GradCache's several backwards per step, and parameters a
batch does not use (a text-only batch never reaches the vision tower) — DDP would need
`no_sync`, `find_unused_parameters` and a static-graph promise for those. The cost is that the
exchange does not overlap the backward; on GPUs at scale use the `deepspeed` engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

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

    @property
    def precision(self) -> str:
        return self._precision

    def autocast(self) -> AbstractContextManager[object]:
        if self._precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self._precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.encoder(inputs).float()

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def reduce_gradients(self) -> None:
        """Average the gradients across ranks (`step` calls it; call it once per step)."""
        world = self.env.world_size
        if world <= 1 or not dist.is_initialized():
            return
        # A parameter this rank did not use has no gradient; it still takes part as zeros,
        # otherwise the flat buffers of the ranks would differ in size.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in self.params:
            g = p.grad
            assert g is not None
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self) -> float:
        self.reduce_gradients()
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

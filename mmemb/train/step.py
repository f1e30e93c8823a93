"""One training step's computation: batch -> encoder -> gather -> loss -> backward (plain or
GradCache). The optimizer step, logging and checkpoints are the trainer's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmemb.data.collate import Batch
from mmemb.loss import Reweighter, gathered_contrastive_loss
from mmemb.recipe import LossConfig, TrainConfig
from mmemb.train.engines.base import Engine
from mmemb.train.grad_cache import grad_cache_step


@dataclass
class StepResult:
    loss: torch.Tensor
    """Detached local loss (this rank's rows)."""
    q: torch.Tensor
    c: torch.Tensor
    """Detached local embeddings (for metrics)."""


@dataclass
class LossFn:
    """The recipe's contrastive loss on embeddings, gathered across ranks."""

    cfg: LossConfig
    reweighter: Reweighter | None
    targets: torch.Tensor

    def __call__(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return gathered_contrastive_loss(
            q, c, self.targets, temperature=self.cfg.temperature, reweighter=self.reweighter,
            tile_size=self.cfg.tile_size, symmetric=self.cfg.symmetric,
        )


def compute_step(
    engine: Engine,
    batch: Batch,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    reweighter: Reweighter | None,
    *,
    check_loss: Callable[[torch.Tensor], None],
) -> StepResult:
    """Forward and backward of one batch; the gradients are left for `engine.step()`.

    `check_loss` is called with the loss before any backward, on every rank (it may raise to stop
    training before a non-finite loss touches the weights).
    """
    loss_fn = LossFn(loss_cfg, reweighter, batch.targets)
    gc = train_cfg.grad_cache
    if gc is not None:
        out = grad_cache_step(
            lambda inputs, last: engine.forward(inputs, sync=last),
            lambda loss, last: engine.backward(loss, last=last),
            batch.query, batch.candidates, loss_fn,
            query_chunk=gc.query_chunk, candidate_chunk=gc.candidate_chunk,
            device=engine.device, check_loss=check_loss, split=engine.encoder.processor.split,
        )
        return StepResult(out.loss, out.q, out.c)
    q, c = engine.forward_pair(batch.query, batch.candidates)
    loss = loss_fn(q, c)
    check_loss(loss)
    engine.backward(loss, last=True)
    return StepResult(loss.detach(), q.detach(), c.detach())

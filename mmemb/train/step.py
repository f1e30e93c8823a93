"""One training step's computation: batch -> encoder -> gather -> loss -> backward (plain or
GradCache). The optimizer step, logging and checkpoints are the trainer's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmemb.data.collate import Batch
from mmemb.loss import ContrastiveLoss
from mmemb.recipe import TrainConfig
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
class BatchLoss:
    """The recipe's loss bound to one batch's targets and content keys: embeddings -> loss."""

    loss: ContrastiveLoss
    batch: Batch

    def __call__(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.loss(q, c, self.batch.targets, keys=self.batch.keys)


def compute_step(
    engine: Engine,
    batch: Batch,
    loss: ContrastiveLoss,
    train_cfg: TrainConfig,
    *,
    check_loss: Callable[[torch.Tensor], None],
) -> StepResult:
    """Forward and backward of one batch; the gradients are left for `engine.step()`.

    `check_loss` is called with the loss before any backward, on every rank (it may raise to stop
    training before a non-finite loss touches the weights).
    """
    loss_fn = BatchLoss(loss, batch)
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
    value = loss_fn(q, c)
    check_loss(value)
    engine.backward(value, last=True)
    return StepResult(value.detach(), q.detach(), c.detach())

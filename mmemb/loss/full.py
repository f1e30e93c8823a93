"""The reference implementation: one direction of the loss on the full B×M logits matrix.

Registered by the kernel as loss ``full`` (the ``tiled`` plugin computes the same values and
gradients without holding the matrix). Columns that copy a row's positive are masked to −∞
before the softmax, so they get neither probability nor gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from mmemb.loss.checks import acc_dtype, check_temperature
from mmemb.loss.layout import DuplicateKeys, duplicate_mask, positive_mask
from mmemb.loss.reweighter import PLAIN, Reweighter, RowStats

__all__ = ["FullMatrixLoss", "FullMatrixLossConfig", "full_matrix_loss", "row_statistics"]


class _FullMatrixCE(torch.autograd.Function):
    """mean_i CE(transform_logits(z)_i, t_i) with the logits gradient (p̄ − y)/B."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, targets: torch.Tensor, tau: float, rw: Reweighter
    ) -> torch.Tensor:
        b = z.shape[0]
        rows = torch.arange(b, device=z.device)
        z_pos = z[rows, targets].unsqueeze(1)
        is_pos = _is_pos_or_empty(rw, targets, z)
        stats = row_statistics(rw, z, z_pos, is_pos, tau)
        zt = (
            rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
            if rw.transforms_logits
            else z
        )
        lse = torch.logsumexp(zt, dim=1)
        loss = (lse - zt[rows, targets]).mean()
        ctx.tau, ctx.rw, ctx.stat_keys = tau, rw, list(stats)
        ctx.save_for_backward(z, targets, lse, *stats.values())
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, targets, lse, *stat_values = ctx.saved_tensors
        rw: Reweighter = ctx.rw
        tau: float = ctx.tau
        stats = dict(zip(ctx.stat_keys, stat_values, strict=True))
        b = z.shape[0]
        rows = torch.arange(b, device=z.device)
        z_pos = z[rows, targets].unsqueeze(1)
        is_pos = _is_pos_or_empty(rw, targets, z)
        zt = (
            rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
            if rw.transforms_logits
            else z
        )
        p = torch.exp(zt - lse[:, None])
        del zt
        if rw.transforms_probs:
            p = rw.transform_probs(p, z, z_pos, is_pos, temperature=tau, stats=stats)
        p[rows, targets] -= 1.0
        p.mul_(grad_out / b)
        return p, None, None, None


def _is_pos_or_empty(rw: Reweighter, targets: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``is_pos`` for the full matrix, or an empty tensor when the reweighter reads none of it."""
    if rw.transforms_logits or rw.transforms_probs or rw.has_row_stats:
        return positive_mask(targets, 0, z.shape[1])
    return torch.empty(0, dtype=torch.bool, device=z.device)


def row_statistics(
    rw: Reweighter, z: torch.Tensor, z_pos: torch.Tensor, is_pos: torch.Tensor, tau: float
) -> RowStats:
    if not rw.has_row_stats:
        return {}
    stats = rw.init_row_stats(z.shape[0], device=z.device, dtype=z.dtype)
    stats = rw.update_row_stats(stats, z.detach(), z_pos.detach(), is_pos, temperature=tau)
    return rw.finalize_row_stats(stats, temperature=tau)


def full_matrix_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    keys: DuplicateKeys | None = None,
) -> torch.Tensor:
    """One direction of the loss on the full B×M matrix (inputs unchecked; see
    ``mmemb.loss.contrastive_loss``). ``keys`` masks the columns that copy a row's positive."""
    rw = reweighter or PLAIN
    acc = acc_dtype(q.dtype)
    tau = check_temperature(temperature, "full_matrix_loss")
    inv = 1.0 / temperature if isinstance(temperature, torch.Tensor) else 1.0 / tau
    z = (q.to(acc) * inv) @ c.to(acc).T
    dup = duplicate_mask(keys, targets, 0, c.shape[0])
    if dup is not None:
        z = z.masked_fill(dup, -torch.inf)
    return _FullMatrixCE.apply(z, targets, tau, rw)


class FullMatrixLossConfig(BaseModel):
    """The ``full`` loss has no options."""

    model_config = ConfigDict(extra="forbid")


class FullMatrixLoss:
    """One direction of the contrastive loss on the whole B×M logits matrix: the reference every
    other implementation is tested against; memory O(B·M). Registered as loss ``full``."""

    name = "full"

    def __init__(self, config: FullMatrixLossConfig | None = None) -> None:
        self.config = config or FullMatrixLossConfig()

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter,
        keys: DuplicateKeys | None = None,
    ) -> torch.Tensor:
        return full_matrix_loss(
            q, c, targets, temperature=temperature, reweighter=reweighter, keys=keys
        )

    def __repr__(self) -> str:
        return "FullMatrixLoss()"

"""``ega``: the Explicit Gradient Amplifier: larger gradients for hard negatives, same loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb.loss import FusedForm, Reweighter, RowStats


class EGAConfig(BaseModel):
    """Options of the Explicit Gradient Amplifier (see :class:`ExplicitGradientAmplifier`)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(default=1.0, ge=0.0, description="amplification α; 0 is plain InfoNCE")
    tau_h: float | None = Field(
        default=None, gt=0.0, description="hardness temperature τ_h; None: the loss temperature"
    )
    hardness: Literal["exp", "linear"] = Field(
        default="exp", description="exp: min(1, exp((s−s+)/τ_h)); linear: clamp((s−s+ + m)/m, 0, 1)"
    )
    margin: float = Field(default=0.1, gt=0.0, description="margin m of the linear hardness")
    normalize: bool = Field(
        default=True,
        description="rescale a row's amplified negatives to their original mass (default: the "
        "un-normalised form collapses from scratch; docs/loss.md, docs/results.md)",
    )
    fn_margin: float | None = Field(
        default=None,
        description="a negative with s − s+ > fn_margin is a likely false negative: h = 0",
    )


class ExplicitGradientAmplifier(Reweighter):
    """Explicit Gradient Amplifier: amplify the gradient of hard negatives, keep the loss value.

    For query i with positive logit ``z_i+`` and softmax ``p_ij`` over its candidates, plain
    InfoNCE gives the logits gradient ``(p_ij − y_ij)/B``. EGA replaces ``p`` by::

        p̄_ij = p_ij · (1 + α·h_ij)      for negatives,      p̄_i+ = p_i+
        ∂L/∂z_ij := (p̄_ij − y_ij) / B

    with the hardness relative to the row's positive (``s = z·τ`` the similarity):

    - ``hardness="exp"`` (default): ``h_ij = min(1, exp((s_ij − s_i+)/τ_h))``; with ``τ_h = τ``
      (the default) this is ``min(1, p_ij/p_i+)``: a negative is fully hard once it scores as
      high as the positive, and its hardness decays exponentially below it;
    - ``hardness="linear"``: ``h_ij = clamp((s_ij − s_i+ + m)/m, 0, 1)`` with ``m = margin``;
    - ``fn_margin``: ``h_ij = 0`` where ``s_ij − s_i+ > fn_margin`` (likely false negatives are
      not amplified);
    - ``normalize``: ``p̄`` of a row's negatives is rescaled by ``Σ_neg p / Σ_neg p(1+αh)`` so the
      negatives keep their original total mass (only the distribution among them changes).

    The loss value is plain InfoNCE's; only the backward changes. With ``alpha=0`` the gradients
    are exactly plain InfoNCE's.

    References:
        Xue, Li & Liu 2025, "Improve Multi-Modal Embedding Learning via Explicit Hard Negative
        Gradient Amplifying", arXiv:2506.02020. The paper's exact hardness function was not
        available to us; this is the documented family above (docs/loss.md).

    Example::

        >>> ega = mmemb.plugins.build("reweighter", "ega", alpha=1.0)
        >>> loss = mmemb.loss.contrastive_loss(q, c, t, temperature=0.02, reweighter=ega)
    """

    name: ClassVar[str] = "ega"
    transforms_probs = True

    def __init__(self, config: EGAConfig | None = None) -> None:
        self.config = config or EGAConfig()
        # Only `normalize` needs a row statistic; without it the hot path has no stats pass.
        self.has_row_stats = self.config.normalize

    def hardness(self, z: torch.Tensor, z_pos: torch.Tensor, *, temperature: float) -> torch.Tensor:
        """``h_ij`` in [0, 1] for logits ``z`` (r, n) and positive logits ``z_pos`` (r, 1)."""
        cfg = self.config
        diff = (z - z_pos) * temperature  # s_ij − s_i+
        if cfg.hardness == "exp":
            tau_h = cfg.tau_h if cfg.tau_h is not None else temperature
            h = torch.exp(torch.clamp(diff / tau_h, max=0.0))
        else:
            h = torch.clamp((diff + cfg.margin) / cfg.margin, 0.0, 1.0)
        if cfg.fn_margin is not None:
            h = torch.where(diff > cfg.fn_margin, torch.zeros_like(h), h)
        return h

    def init_row_stats(self, rows: int, *, device: torch.device, dtype: torch.dtype) -> RowStats:
        # Running max of the negatives' logits, Σ exp(z − m) and Σ exp(z − m)·h over negatives.
        return {
            "max": torch.full((rows,), -torch.inf, device=device, dtype=dtype),
            "mass": torch.zeros(rows, device=device, dtype=dtype),
            "hard_mass": torch.zeros(rows, device=device, dtype=dtype),
        }

    def update_row_stats(
        self,
        stats: RowStats,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
    ) -> RowStats:
        neg_z = torch.where(is_pos, torch.full_like(z, -torch.inf), z)
        new_max = torch.maximum(stats["max"], neg_z.amax(dim=1))
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        decay = torch.exp(stats["max"] - safe)
        e = torch.exp(neg_z - safe[:, None])
        h = self.hardness(z, z_pos, temperature=temperature)
        return {
            "max": new_max,
            "mass": stats["mass"] * decay + e.sum(dim=1),
            "hard_mass": stats["hard_mass"] * decay + (e * h).sum(dim=1),
        }

    def finalize_row_stats(self, stats: RowStats, *, temperature: float) -> RowStats:
        mass, hard = stats["mass"], stats["hard_mass"]
        amplified = mass + self.config.alpha * hard
        ratio = torch.where(mass > 0, mass / torch.where(mass > 0, amplified, 1.0), 1.0)
        return {"ratio": ratio}

    def transform_probs(
        self,
        p: torch.Tensor,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
        stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        weight = 1.0 + self.config.alpha * self.hardness(z, z_pos, temperature=temperature)
        if self.config.normalize:
            weight = weight * stats["ratio"][:, None]
        return torch.where(is_pos, p, p * weight)

    def fused_form(self) -> FusedForm:
        cfg = self.config
        return FusedForm(
            kind="ega",
            alpha=cfg.alpha,
            tau_h=cfg.tau_h,
            hardness=cfg.hardness,
            margin=cfg.margin,
            normalize=cfg.normalize,
            fn_margin=cfg.fn_margin,
        )

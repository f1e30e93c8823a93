"""``topk_mask``: drop likely false negatives, keep only the k hardest remaining negatives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb.loss import FusedForm, Reweighter, RowStats

TIE_TOL = 1e-5
"""Similarities this close to a boundary count as on it: ties at the k-th value are all kept and a
negative exactly at ``s_i+ + delta`` is not dropped, whatever the rounding of the path (full
matrix, tiles, kernel) that scored it, so duplicated candidates are always treated alike."""


class TopKMaskConfig(BaseModel):
    """Options of the top-k mask (see :class:`TopKMask`). The defaults are mmemb's choice."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=8, ge=1, description="hardest negatives kept in each row's softmax")
    delta: float = Field(
        default=0.1,
        ge=0.0,
        description="negatives with s > s+ + delta are dropped as likely false negatives",
    )


class TopKMask(Reweighter):
    """UniME-style hard-negative selection inside the loss.

    For row i with positive similarity ``s_i+``::

        dropped_ij = s_ij > s_i+ + δ                       (likely false negatives)
        θ_i        = k-th largest z_ij over negatives that are not dropped (−∞ if fewer than k)
        z'_ij      = z_ij  if j is the positive, or (not dropped_ij and z_ij ≥ θ_i);  −∞ otherwise
        L = mean_i [logsumexp_j z'_ij − z_i+]

    Only the positive and the ``k`` hardest remaining negatives stay in the softmax; removed
    candidates get no gradient. Both comparisons allow ``TIE_TOL = 1e-5`` in similarity, so ties
    at the k-th value (e.g. a candidate that appears twice in the batch) are all kept and scored
    alike by every path. The value ``θ_i`` is a row statistic, so the tiled loss makes one extra
    pass over each row in the forward.

    References:
        Gu, Yang, Feng, Wang, Zhang, Long, Chen, Cai & Deng 2025, "Breaking the Modality Barrier:
        Universal Embedding Learning with Multimodal LLMs" (UniME), arXiv:2504.17432: filter false
        negatives whose similarity exceeds the positive's by a margin, then sample the k hardest
        negatives per instance. The defaults ``k=8, delta=0.1`` are mmemb's, not the paper's.

    Example::

        >>> topk = mmemb.plugins.build("reweighter", "topk_mask", k=8, delta=0.1)
        >>> loss = mmemb.loss.contrastive_loss(q, c, t, temperature=0.02, reweighter=topk)
    """

    name: ClassVar[str] = "topk_mask"
    transforms_logits = True
    has_row_stats = True
    logits_use_stats = True

    def __init__(self, config: TopKMaskConfig | None = None) -> None:
        self.config = config or TopKMaskConfig()

    def dropped(self, z: torch.Tensor, z_pos: torch.Tensor, *, temperature: float) -> torch.Tensor:
        """True where ``s_ij > s_i+ + delta`` (beyond the tie tolerance)."""
        return (z - z_pos) * temperature > self.config.delta + TIE_TOL

    def init_row_stats(self, rows: int, *, device: torch.device, dtype: torch.dtype) -> RowStats:
        return {"best": torch.full((rows, self.config.k), -torch.inf, device=device, dtype=dtype)}

    def update_row_stats(
        self,
        stats: RowStats,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
    ) -> RowStats:
        out = is_pos | self.dropped(z, z_pos, temperature=temperature)
        candidates = torch.where(out, torch.full_like(z, -torch.inf), z)
        merged = torch.cat([stats["best"], candidates], dim=1)
        return {"best": merged.topk(self.config.k, dim=1).values}

    def finalize_row_stats(self, stats: RowStats, *, temperature: float) -> RowStats:
        return {"threshold": stats["best"][:, self.config.k - 1].contiguous()}

    def transform_logits(
        self,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
        stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        keep = ~self.dropped(z, z_pos, temperature=temperature) & (
            (z - stats["threshold"][:, None]) * temperature >= -TIE_TOL
        )
        keep = keep | is_pos
        return torch.where(keep, z, torch.full_like(z, -torch.inf))

    def fused_form(self) -> FusedForm:
        return FusedForm(
            kind="topk_mask", k=self.config.k, delta=self.config.delta, tie_tol=TIE_TOL
        )

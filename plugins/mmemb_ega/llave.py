"""``llave``: LLaVE's hardness-weighted contrastive learning as a logit offset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb.loss import FusedForm, Reweighter


class LLaVEConfig(BaseModel):
    """Options of the LLaVE reweighter (see :class:`LLaVEReweighter`)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        default=9.0,
        ge=0.0,
        description="hardness weight α (LLaVE's released training: 9 with τ = 0.02)",
    )


class LLaVEReweighter(Reweighter):
    """LLaVE hardness weighting: harder negatives weigh more in the softmax denominator.

    Each negative's term in the denominator is weighted by ``w_ij = exp(α·sg(s_ij))`` (``sg`` =
    stop-gradient, ``s`` the similarity), which is the same as offsetting its logit::

        z'_ij = z_ij + α·sg(s_ij)   for negatives,     z'_i+ = z_i+
        L = mean_i [logsumexp_j z'_ij − z_i+]

    The loss value changes (unlike EGA) and the gradient of the logits is ``(softmax(z') − y)/B``:
    a negative's share grows by ``exp(α·s_ij)``, i.e. more for harder negatives. ``alpha=0`` is
    plain InfoNCE.

    References:
        Lan, Niu, Meng, Zhou & Su 2025, "LLaVE: Large Language and Vision Embedding Models with
        Hardness-Weighted Contrastive Learning", arXiv:2503.04812 (Findings of EMNLP 2025); their
        released training used α = 9 with τ = 0.02.

    Example::

        >>> llave = mmemb.plugins.build("reweighter", "llave", alpha=9.0)
        >>> loss = mmemb.loss.contrastive_loss(q, c, t, temperature=0.02, reweighter=llave)
    """

    name: ClassVar[str] = "llave"
    transforms_logits = True

    def __init__(self, config: LLaVEConfig | None = None) -> None:
        self.config = config or LLaVEConfig()

    def transform_logits(
        self,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
        stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        offset = (self.config.alpha * temperature) * z.detach()  # α·sg(s), s = z·τ
        # a masked copy of the positive (z = −∞) stays −∞: α = 0 would make 0·(−∞) a NaN
        return torch.where(is_pos | torch.isneginf(z), z, z + offset)

    def fused_form(self) -> FusedForm:
        return FusedForm(kind="llave", alpha=self.config.alpha)

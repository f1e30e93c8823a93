"""``none``: plain InfoNCE, the kernel's `mmemb.loss.PlainInfoNCE` under a registry name."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from mmemb.loss import PlainInfoNCE


class NoneConfig(BaseModel):
    """``none`` takes no options."""

    model_config = ConfigDict(extra="forbid")


def build_plain(config: NoneConfig) -> PlainInfoNCE:
    """Plain InfoNCE: ``L = mean_i [logsumexp_j z_ij − z_i+]``, logits gradient ``(p − y)/B``.

    Reference: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
    Coding". Example: ``mmemb.plugins.build("reweighter", "none")``.
    """
    return PlainInfoNCE()

"""The kernel's own loss component, registered like any plugin: ``full``, the reference."""

from __future__ import annotations

from mmemb.hookspecs import hookimpl
from mmemb.loss.full import FullMatrixLoss, FullMatrixLossConfig
from mmemb.plugins import Registrar


@hookimpl
def mmemb_register_losses(registry: Registrar) -> None:
    registry.add(
        "full",
        FullMatrixLoss,
        config=FullMatrixLossConfig,
        summary="contrastive loss on the whole B×M logits matrix (the reference; O(B·M) memory)",
    )

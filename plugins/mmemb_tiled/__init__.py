"""The tiled contrastive loss: PyTorch tiles on any device, a Triton kernel on CUDA.

Registered as loss ``tiled``; ``mmemb.loss.contrastive_loss(..., tile_size=T)`` uses it.
"""

from __future__ import annotations

import mmemb
from mmemb.plugins import Registrar
from mmemb_tiled.tiled_loss import TiledContrastiveLoss, TiledLossConfig

__all__ = ["TiledContrastiveLoss", "TiledLossConfig"]


@mmemb.hookimpl
def mmemb_register_losses(registry: Registrar) -> None:
    registry.add(
        "tiled",
        TiledContrastiveLoss,
        config=TiledLossConfig,
        summary="contrastive loss over tiles: O(tile²) logits memory; Triton kernel on CUDA",
    )

"""The loss implementation a test asks for by tile size: None is the full matrix."""

from __future__ import annotations

from mmemb import plugins
from mmemb.loss import DirectionalLoss


def impl(tile_size: int | None) -> DirectionalLoss | None:
    """``None`` → the full matrix (``contrastive_loss``'s default); an int → the tiled loss."""
    if tile_size is None:
        return None
    return plugins.build("loss", "tiled", tile_size=tile_size)

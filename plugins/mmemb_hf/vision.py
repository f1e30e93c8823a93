"""Images in and image features out: decoding item bytes to RGB, downscaling, and placing a vision
tower's features at the image tokens of the token embeddings."""

from __future__ import annotations

import inspect
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmemb.errors import DataError, MmembError

if TYPE_CHECKING:
    import torch
    from PIL import Image

def decode_image(data: bytes, *, index: int, side: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise a `DataError` naming the item."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        head = data[:8].hex()
        raise DataError(
            f"{side} item {index} of this batch: its image ({len(data)} bytes, starting "
            f"0x{head}) cannot be decoded: {exc}. Store images as JPEG or PNG bytes; re-run "
            "`mmemb prepare` with --on-error skip to drop such rows with a reject count."
        ) from exc
    if rgb.width < 1 or rgb.height < 1:
        raise DataError(f"{side} item {index} of this batch: its image is empty ({rgb.size}).")
    return rgb


def limit_image_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (keeping the aspect ratio) so the longer side is at most `max_side` pixels."""
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    from PIL import Image

    return img.resize(size, Image.Resampling.BICUBIC)


def image_features(get_image_features: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """Call an HF model's `get_image_features` and return its per-image features. Asks for an
    output object (`return_dict=True`) where the method takes keyword arguments: under a config
    with ``return_dict=False`` transformers 5 would otherwise return a plain tuple."""
    params = inspect.signature(get_image_features).parameters.values()
    if any(p.kind is p.VAR_KEYWORD or p.name == "return_dict" for p in params):
        kwargs["return_dict"] = True
    return pooled_features(get_image_features(*args, **kwargs))


def pooled_features(out: Any) -> list[torch.Tensor]:
    """The per-image features of a `get_image_features` call: transformers 5 returns an output
    object whose ``pooler_output`` holds them, 4.x the tensors (or a tuple of them) directly."""
    import torch

    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


def scatter_image_features(
    embeds: torch.Tensor, token_mask: torch.Tensor, features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Token embeddings (N, L, H) with the image-token positions (`token_mask`, N x L) replaced,
    in row-major order, by the image features (what the HF models do inside their forward)."""
    import torch

    flat = torch.cat(list(features), dim=0)
    n_tokens = int(token_mask.sum())
    if n_tokens != flat.shape[0]:
        raise MmembError(
            f"the batch holds {n_tokens} image tokens but the vision tower produced "
            f"{flat.shape[0]} features; the processor and the model's config disagree (image "
            "grid pinpoints, patch or merge size). Rebuild the model directory's processor files "
            "from its config."
        )
    mask = token_mask.unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, flat.to(embeds.device, embeds.dtype))

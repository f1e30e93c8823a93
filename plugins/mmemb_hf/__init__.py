"""Hugging Face backbones (LLaVA-OneVision, Qwen2-VL, CLIP/SigLIP, text encoders), poolers, and
tiny random-initialised models of those architectures (`mmemb_hf.tiny`).

Registered through the entry-point group ``mmemb`` (``hf = "mmemb_hf"``) like any third-party
plugin. Registration imports only the pydantic config models; a backbone's module (torch,
transformers) is imported when one is built, `mmemb_hf.tiny` when a tiny model is written.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmemb
from mmemb.testing.tiny_model import TinyModelConfig
from mmemb_hf.configs import ClipConfig, HFTextConfig, LlavaOnevisionConfig, Qwen2VLConfig

if TYPE_CHECKING:
    from mmemb.plugins import Registrar


def _lazy(module: str) -> Any:
    """A factory that imports ``mmemb_hf.<module>`` on first build and calls its `build(cfg)`."""

    def factory(cfg: Any) -> Any:
        return importlib.import_module(f"mmemb_hf.{module}").build(cfg)

    factory.__name__ = f"build_{module}"
    factory.__qualname__ = factory.__name__
    return factory


@mmemb.hookimpl
def mmemb_register_backbones(registry: Registrar) -> None:
    registry.add(
        "llava_onevision", _lazy("llava_onevision"), config=LlavaOnevisionConfig,
        summary="LLaVA-OneVision (SigLIP + Qwen2): chat prompt, AnyRes with max_image_tokens",
    )
    registry.add(
        "qwen2_vl", _lazy("qwen2_vl"), config=Qwen2VLConfig,
        summary="Qwen2-VL / Qwen2.5-VL: chat prompt, dynamic resolution (min/max_pixels)",
    )
    registry.add(
        "clip", _lazy("clip"), config=ClipConfig,
        summary="CLIP/SigLIP dual encoder: image tower, text tower, mean of both for image+text",
    )
    registry.add(
        "hf_text", _lazy("hf_text"), config=HFTextConfig,
        summary="any transformers AutoModel text encoder (BERT/MiniLM, Qwen2 decoder, ...)",
    )


@mmemb.hookimpl
def mmemb_register_poolers(registry: Registrar) -> None:
    from mmemb_hf.poolers import POOLERS

    for name, (cls, summary) in POOLERS.items():
        registry.add(name, cls, summary=summary)


TINY_MODELS: dict[str, tuple[str, str]] = {
    "llava_onevision": (
        "make_tiny_llava_onevision",
        "tiny LLaVA-OneVision: SigLIP 32 px / patch 8 + Qwen2 width 64, AnyRes up to 64x64",
    ),
    "qwen2_vl": (
        "make_tiny_qwen2_vl",
        "tiny Qwen2-VL: 2-layer ViT (patch 8, 2x2 merge) + Qwen2 width 64 with M-RoPE",
    ),
    "clip": ("make_tiny_clip", "tiny CLIP dual encoder: 2-layer towers, width 32, projection 32"),
    "siglip": ("make_tiny_siglip", "tiny SigLIP dual encoder: 2-layer towers, texts padded to 16"),
    "text": ("make_tiny_text_model", "tiny BERT text encoder: 2 layers, width 32"),
}
"""Tiny model kind -> (its builder in `mmemb_hf.tiny`, the line `mmemb plugins list` shows). The
kinds are what ``python -m mmemb.testing.tiny KIND`` accepts."""


def _tiny(function: str) -> Callable[[TinyModelConfig], Path]:
    """A tiny_model factory: imports `mmemb_hf.tiny` (torch, transformers) only when a model is
    written, and calls its `function` with the config's directory, weights flag and seed."""

    def factory(cfg: TinyModelConfig) -> Path:
        make = getattr(importlib.import_module("mmemb_hf.tiny"), function)
        return Path(make(cfg.out_dir, weights=cfg.weights, seed=cfg.seed))

    factory.__name__ = function
    factory.__qualname__ = function
    return factory


@mmemb.hookimpl
def mmemb_register_tiny_models(registry: Registrar) -> None:
    for kind, (function, summary) in TINY_MODELS.items():
        registry.add(kind, _tiny(function), config=TinyModelConfig, summary=summary)

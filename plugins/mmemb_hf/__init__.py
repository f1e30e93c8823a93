"""Hugging Face backbones (LLaVA-OneVision, Qwen2-VL, CLIP/SigLIP, text encoders) and poolers.

Registered through the entry-point group ``mmemb`` (``hf = "mmemb_hf"``) like any third-party
plugin. Registration imports only the pydantic config models; a backbone's module (torch,
transformers) is imported when one is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import mmemb
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

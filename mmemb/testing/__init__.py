"""Helpers for tests and the quickstart: plugin isolation, test images, the caption corpus, and
tiny models written through the ``tiny_model`` registry (`mmemb.testing.tiny_model`).

The kernel knows no architecture: the tiny model builders themselves belong to the plugin that owns
the architecture (``mmemb_hf.tiny.make_tiny_llava_onevision`` and friends); here they are reached by
kind, ``make_tiny_model("llava_onevision", dir)``.

The names are imported lazily, so that importing this package stays cheap and
``python -m mmemb.testing.tiny`` does not import its module twice (once through this package,
once as ``__main__``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "TinyModelConfig": "mmemb.testing.tiny_model",
    "caption_corpus": "mmemb.testing.corpus",
    "make_tiny_model": "mmemb.testing.tiny_model",
    "only_plugins": "mmemb.testing.plugins",
    "shape_png": "mmemb.testing.images",
    "tiny_model_kinds": "mmemb.testing.tiny_model",
}
"""Exported name -> the module that defines it."""

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(
        f"module 'mmemb.testing' has no attribute {name!r}"
        + (
            "; the tiny model builders moved to the plugin that owns the architectures: "
            f"`from mmemb_hf.tiny import {name}`, or `make_tiny_model(kind, dir)` from here"
            if name.startswith(("make_tiny_", "build_tiny_")) else ""
        )
    )

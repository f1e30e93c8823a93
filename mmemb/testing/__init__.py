"""Helpers for tests and the quickstart: tiny models built locally (see `mmemb.testing.tiny`).

The names are imported lazily so that ``python -m mmemb.testing.tiny`` does not import the module
twice (once through this package, once as ``__main__``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FACTORIES",
    "build_tiny_tokenizer",
    "caption_corpus",
    "make_tiny_clip",
    "make_tiny_llava_onevision",
    "make_tiny_qwen2_vl",
    "make_tiny_siglip",
    "make_tiny_text_model",
    "only_plugins",
    "shape_png",
]


def __getattr__(name: str) -> Any:
    if name == "only_plugins":
        return importlib.import_module("mmemb.testing.plugins").only_plugins
    if name == "shape_png":
        return importlib.import_module("mmemb.testing.images").shape_png
    if name in __all__:
        return getattr(importlib.import_module("mmemb.testing.tiny"), name)
    raise AttributeError(f"module 'mmemb.testing' has no attribute {name!r}")

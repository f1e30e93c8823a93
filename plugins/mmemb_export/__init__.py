"""Exporters: a Hugging Face directory (``hf``) and a sentence-transformers directory."""

from __future__ import annotations

from typing import Any

import mmemb
from mmemb_export.hf_dir import HFDirConfig, HFDirExporter
from mmemb_export.st_dir import STDirConfig, STDirExporter


@mmemb.hookimpl
def mmemb_register_exporters(registry: Any) -> None:
    registry.add(
        "hf",
        HFDirExporter,
        config=HFDirConfig,
        summary="Hugging Face directory (safetensors) + prompt/pooling config + model card with "
                "a transformers-only snippet",
    )
    registry.add(
        "sentence-transformers",
        STDirExporter,
        config=STDirConfig,
        summary="sentence-transformers directory (text backbones): SentenceTransformer(dir) "
                "embeds like mmemb",
    )

"""Exporters: a Hugging Face directory with the embedding configuration and a model card."""

from __future__ import annotations

from typing import Any

import mmemb
from mmemb_export.hf_dir import HFDirConfig, HFDirExporter


@mmemb.hookimpl
def mmemb_register_exporters(registry: Any) -> None:
    registry.add(
        "hf",
        HFDirExporter,
        config=HFDirConfig,
        summary="Hugging Face directory (safetensors) + pooling/normalisation config + model card",
    )

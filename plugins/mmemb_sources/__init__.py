"""`mmemb prepare` sources: MMEB train/eval, generic jsonl, image folders, the synthetic generator.

Each source reads one format and yields a `Sample` or a `Reject` per input row (see
`mmemb.data.sources`); `mmemb.data.prepare` checks, counts and writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mmemb
from mmemb_sources.image_folder import ImageFolderConfig, ImageFolderSource
from mmemb_sources.jsonl import JsonlConfig, JsonlSource
from mmemb_sources.mmeb import MMEBEvalConfig, MMEBEvalSource, MMEBTrainConfig, MMEBTrainSource
from mmemb_sources.synthetic import SyntheticConfig, SyntheticSource

if TYPE_CHECKING:
    from mmemb.plugins import Registrar


@mmemb.hookimpl
def mmemb_register_sources(registry: Registrar) -> None:
    registry.add(
        "mmeb_train",
        MMEBTrainSource,
        config=MMEBTrainConfig,
        summary="VLM2Vec/MMEB-train rows (qry, qry_image_path, pos_text, pos_image_path, "
        "neg_text, neg_image_path) from jsonl or parquet",
    )
    registry.add(
        "mmeb_eval",
        MMEBEvalSource,
        config=MMEBEvalConfig,
        summary="MMEB-eval rows (qry_text, qry_img_path, tgt_text[], tgt_img_path[]): each query "
        "with its own candidate list, the first one correct",
    )
    registry.add(
        "jsonl",
        JsonlSource,
        config=JsonlConfig,
        summary="generic jsonl: {id?, dataset?, query, pos, neg?, meta?}, items as text or "
        "{text, image, instruction}",
    )
    registry.add(
        "image_folder",
        ImageFolderSource,
        config=ImageFolderConfig,
        summary="a classification tree root/<class>/<image> -> image -> label-text samples",
    )
    registry.add(
        "synthetic",
        SyntheticSource,
        config=SyntheticConfig,
        summary="coloured-shape scenes with compositional captions and one-attribute hard "
        "negatives (the offline quickstart)",
    )

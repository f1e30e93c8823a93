"""Small helpers shared by the default sources."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# MMEB/VLM2Vec write `<|image_1|>` where the image goes; our items carry the image separately and
# the backbone's processor places its own image tokens, so the marker is removed from the text.
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")

_GENERIC_STEMS = re.compile(
    r"^(train|test|val|valid|validation|dev|eval|data|original|diverse_instruction)$", re.I
)
_SHARD_SUFFIX = re.compile(r"[-_]\d{3,}(-of-\d{3,})?$")


class FileSourceConfig(BaseModel):
    """Arguments shared by sources that read files."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(description="input file(s), directory or glob (--input)")
    image_root: str | None = Field(
        None,
        description="directory relative image paths are resolved against (--image-root); "
        "default: the input file's directory",
    )


def dataset_from_path(path: Path) -> str:
    """A dataset name from a file path: 'CIRR/original-00000-of-00001.parquet' -> 'CIRR',
    'nights.jsonl' -> 'nights' (generic stems like train/test/original use the parent folder)."""
    stem = _SHARD_SUFFIX.sub("", path.stem)
    if _GENERIC_STEMS.match(stem) and path.parent.name:
        return path.parent.name
    return stem or path.parent.name or "dataset"


def strip_placeholder(text: str) -> tuple[str, bool]:
    """(text without `<|image_N|>` markers, whether there was one)."""
    found = bool(IMAGE_PLACEHOLDER.search(text))
    if not found:
        return text, False
    return IMAGE_PLACEHOLDER.sub("", text).strip(), True


def as_list(value: Any) -> list[Any]:
    """None/'' -> [], a scalar -> [scalar], a list/tuple (or numpy array) -> list."""
    if value is None or (isinstance(value, str) and value == ""):
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet
        converted = value.tolist()
        return converted if isinstance(converted, list) else [converted]
    return [value]

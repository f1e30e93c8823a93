"""Small helpers shared by the default sources: image markers, dataset names from file layouts,
finding input files and choosing one split of a dataset."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmemb.data.sources import expand_inputs
from mmemb.errors import DataError

# MMEB/VLM2Vec write `<|image_1|>` where the image goes; our items carry the image separately and
# the backbone's processor places its own image tokens, so the marker is removed from the text.
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")

_GENERIC_STEMS = re.compile(
    r"^(train|test|val|valid|validation|dev|eval|data|original|diverse_instruction)$", re.I
)
_SPLIT_STEMS = re.compile(
    r"^(train|test|val|valid|validation|dev|eval|original|diverse_instruction)$", re.I
)
_SHARD_SUFFIX = re.compile(r"[-_]\d{3,}(-of-\d{3,})?$")
# The hub's files: `CIRR/original-00000-of-00001.parquet` (split "original" of subset CIRR) ...
_HUB_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
# ... and its automatic parquet conversion: `ImageNet_1K/original/0000.parquet`.
_CONVERTED_SHARD = re.compile(r"^\d{4,}$")


class FileSourceConfig(BaseModel):
    """Arguments shared by sources that read files."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(description="input file(s), directory or glob (--input)")
    image_root: str | None = Field(
        None,
        description="directory relative image paths are resolved against (--image-root); "
        "default: the input file's directory",
    )


@dataclass(frozen=True)
class InputFile:
    """One input file and what its place in a layout says: the dataset it belongs to, the split
    it holds (None if the layout names none), the folder its relative image paths most likely
    start from, and a short name that is unique among the dataset's files (for sample ids)."""

    path: Path
    dataset: str
    split: str | None
    root: Path
    root_why: str
    id_stem: str


def describe(path: Path) -> InputFile:
    """Read a file's layout from its path.

    - ``CIRR/original-00000-of-00001.parquet`` (the hub's files): dataset CIRR, split original,
      images relative to the folder above ``CIRR`` (where MMEB-train's ``images/`` is);
    - ``ImageNet_1K/original/0000.parquet`` (the hub's auto-converted parquet): dataset
      ImageNet_1K, split original, images relative to the folder above ``ImageNet_1K``;
    - ``CIRR/train.jsonl``: dataset CIRR, split train, images as for the hub's files;
    - ``CIRR.parquet``, ``nights.jsonl``: dataset from the file name, no split, images relative
      to the file's folder.
    """
    parent = path.parent
    stem = path.stem
    if _CONVERTED_SHARD.match(stem) and parent.name and parent.parent.name:
        split = parent.name.removeprefix("partial-")  # the hub writes partial-<split> for big sets
        return InputFile(
            path, parent.parent.name, split, parent.parent.parent,
            f"the folder above the dataset folder {parent.parent.name}/ (the hub's layout "
            f"{parent.parent.name}/{parent.name}/{path.name})",
            f"{parent.name}/{stem}",
        )
    hub = _HUB_SHARD.match(stem)
    split_stem = _SPLIT_STEMS.match(stem)
    if (hub or split_stem) and parent.name:
        split = hub["split"] if hub else stem
        return InputFile(
            path, parent.name, split, parent.parent,
            f"the folder above the dataset folder {parent.name}/ (the hub's layout "
            f"{parent.name}/{path.name})",
            stem,
        )
    return InputFile(path, _dataset_from_stem(path), None, parent, "the input file's folder", stem)


def _dataset_from_stem(path: Path) -> str:
    stem = _SHARD_SUFFIX.sub("", path.stem)
    if _GENERIC_STEMS.match(stem) and path.parent.name:
        return path.parent.name
    return stem or path.parent.name or "dataset"


def dataset_from_path(path: Path) -> str:
    """A dataset name from a file path: 'CIRR/original-00000-of-00001.parquet' -> 'CIRR',
    'ImageNet_1K/original/0000.parquet' -> 'ImageNet_1K', 'nights.jsonl' -> 'nights'
    (generic stems like train/test/original use the parent folder)."""
    return describe(path).dataset


def find_inputs(input: str | Sequence[str], suffixes: Sequence[str]) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for every input file, in order, each once.

    A directory gives its files with one of `suffixes` and the hub's converted shards one folder
    down (``<dir>/<split>/0000.parquet``); a glob gives what it matches; a file is itself."""
    items = [input] if isinstance(input, str) else list(input)
    out: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            found = [(p, True)]
        elif p.is_dir():
            direct = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes)
            converted = sorted(
                f
                for sub in p.iterdir()
                if sub.is_dir() and not sub.name.startswith(".")
                for f in sub.iterdir()
                if f.is_file() and f.suffix in suffixes and _CONVERTED_SHARD.match(f.stem)
            )
            if not direct and not converted:
                raise DataError(
                    f"{p} (--input): the directory has no {'/'.join(suffixes)} files, directly or "
                    "as <split>/0000.parquet. Point --input at a dataset folder (MMEB-train/CIRR), "
                    "a file, or a quoted glob ('MMEB-train/*/original-*.parquet')."
                )
            found = [(f, False) for f in direct + converted]
        else:
            found = [(f, False) for f in expand_inputs(str(item), suffixes)]
        for f, explicit in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append((f, explicit))
    return out


def choose_split(
    files: list[tuple[Path, bool]], split: str | None, default: str, *, input: Any
) -> list[InputFile]:
    """The files to read: one split per dataset.

    The hub stores each dataset's variants side by side (MMEB-train/CIRR holds ``original-``,
    ``diverse_instruction-`` and ``train-`` files, the same queries worded differently); reading
    them together would repeat every query. Files found through a directory or a glob are kept
    only for `split` -- or, when it is None, the dataset's only split, else `default` if present,
    else an error listing the splits found. Files named one by one are always read (and must be
    of `split` when it is given)."""
    described = [(describe(p), explicit) for p, explicit in files]
    if split is not None:
        for info, explicit in described:
            if explicit and info.split not in (None, split):
                raise DataError(
                    f"--input {info.path} holds split '{info.split}' of {info.dataset}, but "
                    f"split={split} was asked for. Drop one of the two, or name the "
                    f"{split} file instead."
                )
    by_dataset: dict[str, set[str]] = {}
    for info, explicit in described:
        if info.split is not None and not explicit:
            by_dataset.setdefault(info.dataset, set()).add(info.split)
    keep: dict[str, str] = {}
    for dataset, splits in by_dataset.items():
        if split is not None:
            if split not in splits:
                raise DataError(
                    f"--input {_show(input)}: dataset {dataset} has no split '{split}' (found: "
                    f"{', '.join(sorted(splits))}). Pass --arg split=NAME with one of them."
                )
            keep[dataset] = split
        elif len(splits) == 1:
            keep[dataset] = next(iter(splits))
        elif default in splits:
            keep[dataset] = default
        else:
            raise DataError(
                f"--input {_show(input)}: dataset {dataset} comes in {len(splits)} splits "
                f"({', '.join(sorted(splits))}); reading them together would repeat every query. "
                f"Choose one with --arg split=NAME (e.g. --arg split={sorted(splits)[0]})."
            )
    return [
        info
        for info, explicit in described
        if explicit or info.split is None or keep.get(info.dataset) == info.split
    ]


def _show(input: Any) -> str:
    return input if isinstance(input, str) else " ".join(map(str, input))


def remove_placeholder(text: str) -> tuple[str, bool]:
    """(text without its `<|image_N|>` markers, whether there was one). Only the markers go: the
    rest of the text is kept verbatim, whitespace included (as VLM2Vec, which swaps the marker
    for its backbone's image token in place)."""
    found = bool(IMAGE_PLACEHOLDER.search(text))
    if not found:
        return text, False
    return IMAGE_PLACEHOLDER.sub("", text), True


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

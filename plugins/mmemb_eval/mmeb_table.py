"""The MMEB benchmark's 36 evaluation datasets, their meta-tasks and IND/OOD split, the averages.

MMEB (Jiang et al., "VLM2Vec", 2024) groups its 36 evaluation sets into four meta-tasks and splits
them into the 20 sets whose training portion is in MMEB-train (in-distribution, IND) and 16 held-out
sets (out-of-distribution, OOD). The leaderboard reports, for every group, the plain mean of the
per-dataset Precision@1 of the group's datasets; "Overall" is the mean over all 36 datasets (not the
mean of the four meta-task means). A group with a missing dataset has no score here: it is reported
as missing with the list of absent datasets, and a `partial` mean over the present ones, labelled as
such, is given beside it so a subset run is still readable but never mistaken for the real number.

The table belongs to the ``mmeb`` eval task (this plugin); the kernel knows only the generic
`mmemb.eval.groups` (`GroupScore`, `mean_group`), which results and reports are made of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mmemb.errors import DataError
from mmemb.eval.groups import GroupScore, mean_group

META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "VQA": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
        "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "Retrieval": (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
    ),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
"""Meta-task -> its datasets, in the leaderboard's column order (MMEB-eval subset names)."""

IND_DATASETS: tuple[str, ...] = (
    # The 20 datasets with a training split in MMEB-train (TIGER-Lab/MMEB-train subsets).
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
    "WebQA",
    "MSCOCO",
)

MMEB_DATASETS: tuple[str, ...] = tuple(d for ds in META_TASKS.values() for d in ds)
"""All 36 evaluation datasets, meta-task by meta-task."""

OOD_DATASETS: tuple[str, ...] = tuple(d for d in MMEB_DATASETS if d not in IND_DATASETS)

GROUPS: dict[str, tuple[str, ...]] = {
    **META_TASKS,
    "IND": IND_DATASETS,
    "OOD": OOD_DATASETS,
    "Overall": MMEB_DATASETS,
}
"""Every reported group -> the datasets it averages, in the order of the leaderboard's columns."""

META_TASK_OF: dict[str, str] = {d: task for task, ds in META_TASKS.items() for d in ds}


def _norm(name: str) -> str:
    # MMEB-train spells some sets differently from MMEB-eval ("ImageNet_1K" vs "ImageNet-1K") and
    # users type them freely; case, '-', '_', ' ' and '.' never distinguish two MMEB datasets.
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_NORM: dict[str, str] = {_norm(d): d for d in MMEB_DATASETS}
assert len(_BY_NORM) == len(MMEB_DATASETS), "two MMEB dataset names normalise to the same key"
_GROUP_BY_NORM: dict[str, str] = {_norm(g): g for g in GROUPS}


def canonical_dataset(name: str) -> str | None:
    """The MMEB-eval spelling of dataset `name` ('imagenet_1k' -> 'ImageNet-1K'), or None."""
    return _BY_NORM.get(_norm(name))


def canonical_group(name: str) -> str | None:
    """The reported spelling of group `name` ('overall' -> 'Overall', 'ood' -> 'OOD'), or None."""
    return _GROUP_BY_NORM.get(_norm(name))


def split_of(dataset: str) -> str | None:
    """'IND' or 'OOD' for an MMEB dataset (any spelling), None for others."""
    canon = canonical_dataset(dataset)
    if canon is None:
        return None
    return "IND" if canon in IND_DATASETS else "OOD"


def mmeb_groups(
    scores: Mapping[str, Mapping[str, float]], metrics: Iterable[str] = ("precision@1",)
) -> tuple[list[GroupScore], list[str]]:
    """The leaderboard's groups (4 meta-tasks, IND, OOD, Overall) from per-dataset `scores`.

    Keys of `scores` may use any spelling of an MMEB dataset name; each is matched to its canonical
    name (two keys naming the same dataset is an error). Returns the groups and the keys that are
    not MMEB datasets (reported separately, never folded into a benchmark average).
    """
    by_canon: dict[str, Mapping[str, float]] = {}
    others: list[str] = []
    seen: dict[str, str] = {}
    for key, value in scores.items():
        canon = canonical_dataset(key)
        if canon is None:
            others.append(key)
            continue
        if canon in seen:
            raise DataError(
                f"datasets {seen[canon]!r} and {key!r} are both MMEB's {canon!r}: the data holds "
                "the same benchmark set twice under two names. Evaluate it once (drop one)."
            )
        seen[canon] = key
        by_canon[canon] = value
    metric_names = list(metrics)
    groups = [mean_group(g, members, by_canon, metric_names) for g, members in GROUPS.items()]
    return groups, others

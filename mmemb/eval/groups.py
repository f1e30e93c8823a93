"""Averages over groups of datasets: what eval tasks report beside per-dataset scores.

A group with a missing dataset has no score: it is reported as missing with the list of absent
datasets, and a `partial` mean over the present ones, labelled as such, is given beside it so a
subset run is still readable but never mistaken for the real number. Which groups there are is
the eval task's business (the MMEB table lives with the ``mmeb`` task, in ``mmemb_eval``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GroupScore:
    """One group's average: `metrics` only when every dataset of the group is present.

    `partial` holds the mean over the datasets that are present (when at least one is); it is a
    different number from the benchmark's and is always shown with `n_present`/`n_total`.
    """

    name: str
    datasets: list[str]
    present: list[str]
    missing: list[str]
    metrics: dict[str, float | None] = field(default_factory=dict)
    partial: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def n_present(self) -> int:
        return len(self.present)

    @property
    def n_total(self) -> int:
        return len(self.datasets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "datasets": list(self.datasets), "present": list(self.present),
            "missing": list(self.missing), "metrics": dict(self.metrics),
            "partial": dict(self.partial),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupScore:
        return cls(
            name=d["name"], datasets=list(d["datasets"]), present=list(d["present"]),
            missing=list(d["missing"]), metrics=dict(d.get("metrics", {})),
            partial=dict(d.get("partial", {})),
        )


def mean_group(
    name: str,
    datasets: Iterable[str],
    scores: Mapping[str, Mapping[str, float]],
    metrics: Iterable[str],
) -> GroupScore:
    """Average `metrics` over `datasets` (keys of `scores`); an absent one makes it missing."""
    members = list(datasets)
    present = [d for d in members if d in scores]
    missing = [d for d in members if d not in scores]
    metric_names = list(metrics)
    partial = {
        m: sum(float(scores[d][m]) for d in present) / len(present)
        for m in metric_names
        if present
    }
    complete: dict[str, float | None] = {
        m: (partial[m] if not missing and present else None) for m in metric_names
    }
    return GroupScore(name, members, present, missing, complete, partial)

"""The protocol an eval task plugin implements, and the per-dataset result it returns.

The runner (`mmemb.eval.runner`) encodes every dataset once into an `EncodedDataset` (distinct
query/target embeddings plus the candidate-list structure) and hands it to the task, which turns it
into metrics; the task also says how datasets are grouped and averaged. Tasks are found through the
``eval_task`` registry (``mmemb.plugins.build("eval_task", name, **args)``), never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mmemb.eval.dataset_embeddings import EncodedDataset
from mmemb.eval.groups import GroupScore


@dataclass
class DatasetResult:
    """One dataset's scores.

    `metrics` are the task's reported metrics (percent); `extra` holds secondary numbers shown in
    the JSON only (e.g. Precision@1 with the other tie rule); `counts` the exact sizes evaluated
    (queries, candidates, ties, ...). `meta_task`/`split` place an MMEB dataset in the leaderboard.
    """

    name: str
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    meta_task: str | None = None
    split: str | None = None
    data_fingerprint: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics), "counts": dict(self.counts), "extra": dict(self.extra),
            "meta_task": self.meta_task, "split": self.split,
            "data_fingerprint": self.data_fingerprint, "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> DatasetResult:
        return cls(
            name=name, metrics=dict(d["metrics"]), counts=dict(d.get("counts", {})),
            extra=dict(d.get("extra", {})), meta_task=d.get("meta_task"), split=d.get("split"),
            data_fingerprint=d.get("data_fingerprint", ""), cached=bool(d.get("cached", False)),
        )


@dataclass
class Summary:
    """A task's aggregate view: `groups` (each a mean over named datasets), the evaluated datasets
    that belong to no group (`ungrouped`), and the headline number (`overall`, None if
    incomplete)."""

    groups: list[GroupScore]
    ungrouped: list[str]
    overall: float | None


@runtime_checkable
class EvalTask(Protocol):
    """What `mmemb eval` needs from an ``eval_task`` component.

    `metric_labels` maps each metric key of `DatasetResult.metrics` to its column header, in
    display order; `primary_metric` is the one averaged into groups' headline and compared.
    """

    name: str
    primary_metric: str
    metric_labels: Mapping[str, str]

    def describe(self) -> dict[str, Any]:
        """The task's settings, recorded in results.json."""
        ...

    def notes(self) -> list[str]:
        """Lines explaining how to read the numbers (tie handling, ...), shown under the table."""
        ...

    def score(self, data: EncodedDataset) -> DatasetResult:
        """Metrics for one encoded dataset."""
        ...

    def summarize(self, results: Mapping[str, DatasetResult]) -> Summary:
        """Groups and the overall score from every dataset's result."""
        ...

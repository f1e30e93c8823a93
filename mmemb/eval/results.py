"""`EvalResults`: everything one evaluation produced, as data (written to/read from results.json).

It carries the per-dataset scores and exact counts, the groups and overall score, the fingerprints
of model and data, the software versions and run settings, and any reference scores put beside
ours. Rendering (markdown table, comparison) lives in `mmemb.eval.report` and works from this data
alone, so a results.json from another machine renders and compares the same way. The dependency
runs one way: this module calls the renderer, which needs `EvalResults` only as a type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmemb.errors import DataError
from mmemb.eval.groups import GroupScore
from mmemb.eval.report import Reference, to_markdown
from mmemb.eval.task import DatasetResult
from mmemb.fileio import atomic_write_text

__all__ = ["RESULTS_FORMAT", "RESULTS_VERSION", "EvalResults", "Reference"]

RESULTS_FORMAT = "mmemb-eval-results"
RESULTS_VERSION = 1


@dataclass
class EvalResults:
    """The outcome of `mmemb.eval.evaluate` (also `EvalResults.load("results/results.json")`).

    - `datasets`: name -> `DatasetResult` (metrics in percent, exact counts, IND/OOD, meta-task);
    - `groups`: the task's averages (MMEB: Classification, VQA, Retrieval, Grounding, IND, OOD,
      Overall); a group's `metrics` are None unless all its datasets were evaluated, `partial` is
      the mean over the ones present;
    - `overall`: the headline number (MMEB: mean over all 36 datasets) or None when incomplete;
    - `ungrouped`: evaluated datasets outside every group (reported, never averaged into a group);
    - `fingerprint`: ``{"model": {...parts, "id"}, "data": {dataset: fingerprint}, "id": ...}``;
    - `versions`, `settings` (batch size, world size, precision, device, model path), `notes`;
    - `references`: published scores shown beside ours.
    """

    task: str
    primary_metric: str
    metric_labels: dict[str, str]
    datasets: dict[str, DatasetResult]
    groups: list[GroupScore]
    overall: float | None
    ungrouped: list[str] = field(default_factory=list)
    task_config: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    references: dict[str, Reference] = field(default_factory=dict)
    created: str = ""

    # -- convenience --------------------------------------------------------------------------

    @property
    def scores(self) -> dict[str, float]:
        """Dataset -> primary metric (MMEB: Precision@1 in percent)."""
        return {name: r.metrics[self.primary_metric] for name, r in self.datasets.items()}

    @property
    def mean_evaluated(self) -> float | None:
        """Mean of the primary metric over every evaluated dataset (whatever the benchmark groups
        say); the headline for runs on data that is not the full benchmark, e.g. the quickstart."""
        values = list(self.scores.values())
        return sum(values) / len(values) if values else None

    def group(self, name: str) -> GroupScore:
        """The group called `name` (e.g. 'Classification', 'IND', 'Overall')."""
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups)
        raise KeyError(f"no group {name!r} in these results (groups: {known})")

    def to_markdown(self) -> str:
        """The leaderboard-style report (what results.md holds)."""
        return to_markdown(self)

    # -- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "task": self.task,
            "task_config": self.task_config,
            "primary_metric": self.primary_metric,
            "metric_labels": dict(self.metric_labels),
            "overall": _finite_or_none(self.overall),
            "mean_evaluated": _finite_or_none(self.mean_evaluated),
            "groups": [g.to_dict() for g in self.groups],
            "ungrouped": list(self.ungrouped),
            "datasets": {name: r.to_dict() for name, r in self.datasets.items()},
            "fingerprint": self.fingerprint,
            "versions": self.versions,
            "settings": self.settings,
            "notes": list(self.notes),
            "references": {name: r.to_dict() for name, r in self.references.items()},
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "results") -> EvalResults:
        if d.get("format") != RESULTS_FORMAT:
            raise DataError(
                f"{where}: not an mmemb eval results file (format is {d.get('format')!r}, expected "
                f"{RESULTS_FORMAT!r}). Pass the results.json written by `mmemb eval --out`."
            )
        if d.get("version") != RESULTS_VERSION:
            raise DataError(
                f"{where}: results format version {d.get('version')}, this mmemb reads version "
                f"{RESULTS_VERSION}. Re-run the eval (the embedding cache is reused)."
            )
        return cls(
            task=d["task"],
            primary_metric=d["primary_metric"],
            metric_labels=dict(d["metric_labels"]),
            datasets={n: DatasetResult.from_dict(n, r) for n, r in d["datasets"].items()},
            groups=[GroupScore.from_dict(g) for g in d["groups"]],
            overall=d.get("overall"),
            ungrouped=list(d.get("ungrouped", [])),
            task_config=dict(d.get("task_config", {})),
            fingerprint=dict(d.get("fingerprint", {})),
            versions=dict(d.get("versions", {})),
            settings=dict(d.get("settings", {})),
            notes=list(d.get("notes", [])),
            references={
                n: Reference(n, dict(r["scores"]), r.get("source", ""))
                for n, r in d.get("references", {}).items()
            },
            created=d.get("created", ""),
        )

    def save(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``results.json`` and ``results.md`` into directory `out`; returns both paths."""
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "results.json", directory / "results.md"
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        """Read a results.json (or the directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise DataError(
                f"{p}: no such results file. Pass the results.json of an `mmemb eval --out` run."
            )
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{p}: cannot read it as JSON ({exc})") from exc
        try:
            return cls.from_dict(doc, where=str(p))
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{p}: the results file is incomplete or damaged (missing {exc})"
            ) from exc


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


"""The MMEB eval task: Precision@1 of each query over its own candidate list (positive first).

Scores follow VLM2Vec's ``eval.py``: dot products of the (normalised, if the encoder normalises)
float32 embeddings, argmax over the list, a hit when it is the positive; an exact tie with the
positive counts as a hit there (``np.argmax`` returns the first maximum and the positive is first).
That is the default here (``ties: hit``) and every tie is counted; ``ties: miss`` reports the strict
number instead. Both numbers are in results.json either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmemb.eval.dataset_embeddings import EncodedDataset
from mmemb.eval.metrics import candidate_list_scores, precision_at_1
from mmemb.eval.task import DatasetResult, Summary
from mmemb_eval.mmeb_table import META_TASK_OF, canonical_dataset, mmeb_groups, split_of

METRIC = "precision@1"


class MMEBConfig(BaseModel):
    """`--task mmeb` settings."""

    model_config = ConfigDict(extra="forbid")

    ties: Literal["hit", "miss"] = Field(
        "hit",
        description="How a negative scoring exactly as high as the positive counts: 'hit' as the "
                    "reference implementation (VLM2Vec) does, or 'miss' (strict).",
    )


class MMEBTask:
    """Precision@1 per dataset, grouped into MMEB's meta-tasks, IND/OOD and overall."""

    name = "mmeb"
    primary_metric = METRIC
    metric_labels: Mapping[str, str] = {METRIC: "P@1"}

    def __init__(self, config: MMEBConfig | None = None) -> None:
        self.config = config or MMEBConfig.model_validate({})

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()

    def notes(self) -> list[str]:
        if self.config.ties == "hit":
            rule = ("counted as hits, as in the reference implementation (VLM2Vec takes the argmax "
                    "over the list with the positive first)")
        else:
            rule = "counted as misses (strict; the reference implementation counts them as hits)"
        return [
            "P@1: each query ranked against its own candidate list by dot product of the float32 "
            "embeddings; a hit when the positive (the first candidate) scores highest. In percent.",
            f"Ties (a negative scoring exactly as high as the positive) are {rule}; the Ties "
            "column counts them. Identical candidates (same text, image and instruction) share one "
            "embedding, so a duplicate of the positive always ties.",
            "Group averages are plain means over their datasets as on the MMEB leaderboard; "
            "Overall is the mean over all 36 datasets, IND over the 20 with MMEB-train data, OOD "
            "over the 16 others.",
        ]

    def score(self, data: EncodedDataset) -> DatasetResult:
        scores = candidate_list_scores(
            data.queries, data.targets, data.query_index, data.cand_offsets, data.cand_index
        )
        outcome = precision_at_1(scores, ties=self.config.ties)
        other = "miss" if self.config.ties == "hit" else "hit"
        alt = outcome.precision_ties_miss if other == "miss" else outcome.precision_ties_hit
        canon = canonical_dataset(data.name)
        return DatasetResult(
            name=data.name,
            metrics={METRIC: outcome.precision},
            counts={**data.counts(), "hits": outcome.hits, "tied": outcome.tied},
            extra={f"{METRIC} (ties as {other})": alt},
            meta_task=META_TASK_OF.get(canon) if canon else None,
            split=split_of(data.name),
        )

    def summarize(self, results: Mapping[str, DatasetResult]) -> Summary:
        groups, others = mmeb_groups({n: r.metrics for n, r in results.items()}, (METRIC,))
        overall = next(g for g in groups if g.name == "Overall").metrics.get(METRIC)
        return Summary(groups=groups, ungrouped=others, overall=overall)

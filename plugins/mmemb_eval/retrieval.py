"""The global-retrieval eval task: each dataset's queries against one shared corpus.

The corpus of a dataset is every distinct candidate of its samples (positives and negatives); the
relevant documents of a query are the positives of every sample with that same query (text, image
and instruction), so a query with several correct answers (an image with five captions) gets them
all. Recall@k, MRR@10 and NDCG@10 with binary relevance, in percent, computed with an exact chunked
top-k whose memory does not grow with the corpus (faiss's exact index when installed and chosen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmemb.eval.dataset_embeddings import EncodedDataset
from mmemb.eval.groups import mean_group
from mmemb.eval.metrics import retrieval_metrics, topk_search
from mmemb.eval.task import DatasetResult, Summary


class RetrievalConfig(BaseModel):
    """`--task retrieval` settings."""

    model_config = ConfigDict(extra="forbid")

    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 10], description="k of Recall@k")
    mrr_at: int = Field(10, ge=1, description="cut-off of MRR")
    ndcg_at: int = Field(10, ge=1, description="cut-off of NDCG")
    query_chunk: int = Field(1024, ge=1, description="queries scored at once")
    corpus_chunk: int = Field(65536, ge=1, description="corpus rows scored at once (memory bound)")
    backend: Literal["auto", "torch", "faiss"] = Field(
        "auto",
        description="top-k search: faiss exact inner product when installed ('auto'), or torch",
    )

    @field_validator("recall_at")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("recall_at must be a non-empty list of integers >= 1")
        return sorted(set(v))


class RetrievalTask:
    """Recall@k, MRR@k, NDCG@k per dataset over the dataset's pooled candidates."""

    name = "retrieval"

    def __init__(self, config: RetrievalConfig | None = None) -> None:
        self.config = config or RetrievalConfig.model_validate({})
        c = self.config
        labels = {f"recall@{k}": f"R@{k}" for k in c.recall_at}
        labels[f"mrr@{c.mrr_at}"] = f"MRR@{c.mrr_at}"
        labels[f"ndcg@{c.ndcg_at}"] = f"NDCG@{c.ndcg_at}"
        self.metric_labels: Mapping[str, str] = labels
        self.primary_metric = f"ndcg@{c.ndcg_at}"

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()

    def notes(self) -> list[str]:
        return [
            "Corpus: every distinct candidate of the dataset's samples; a query's relevant "
            "documents are the positives of all samples sharing that query. Binary relevance.",
            "Recall@k: share of a query's relevant documents in its top k; MRR: reciprocal rank of "
            "the first relevant one; NDCG: gain 1/log2(rank+1) (trec_eval). Means over distinct "
            "queries, in percent. Exact top-k; ties go to the document seen first.",
        ]

    def score(self, data: EncodedDataset) -> DatasetResult:
        c = self.config
        relevant: list[set[int]] = [set() for _ in range(len(data.queries))]
        for q, pos in zip(data.query_index.tolist(), data.positives.tolist(), strict=True):
            relevant[q].add(pos)
        k = max([*c.recall_at, c.mrr_at, c.ndcg_at])
        _, ranked = topk_search(
            data.queries, data.targets, k, query_chunk=c.query_chunk,
            corpus_chunk=c.corpus_chunk, backend=c.backend,
        )
        metrics = retrieval_metrics(
            ranked, relevant, recall_at=c.recall_at, mrr_at=c.mrr_at, ndcg_at=c.ndcg_at
        )
        counts = {
            **data.counts(),
            "retrieval_queries": len(data.queries),
            "corpus": len(data.targets),
            "relevant_total": sum(len(r) for r in relevant),
        }
        return DatasetResult(name=data.name, metrics=metrics, counts=counts)

    def summarize(self, results: Mapping[str, DatasetResult]) -> Summary:
        group = mean_group("Mean", list(results), {n: r.metrics for n, r in results.items()},
                           self.metric_labels)
        return Summary(groups=[group], ungrouped=[], overall=group.metrics.get(self.primary_metric))

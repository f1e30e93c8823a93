"""Evaluation: the MMEB protocol and global retrieval, with an embedding cache and reports.

    >>> from mmemb.eval import evaluate                      # doctest: +SKIP
    >>> res = evaluate(encoder, ["data/mmeb_eval"], out="results/", cache_dir="results/cache")
    >>> res.overall, res.scores["ImageNet-1K"], res.group("IND").metrics
    >>> print(res.to_markdown())

Modules: `runner` (evaluate, evaluate_path), `inputs` (eval data -> one job per dataset; the
model argument), `dataset_embeddings` (dedup + sharded encoding), `cache` (fingerprints, on-disk
cache), `metrics` (P@1, top-k, Recall/MRR/NDCG), `groups` (averages over groups of datasets),
`results` (EvalResults), `report` (markdown, references, compare), `task` (the protocol eval-task
plugins implement). The tasks themselves (``mmeb``, ``retrieval``) are plugins in the
``eval_task`` registry; the MMEB table (36 datasets, meta-tasks, IND/OOD) is
``mmemb_eval.mmeb_table``.
"""

from mmemb.eval.dataset_embeddings import EncodedDataset
from mmemb.eval.groups import GroupScore
from mmemb.eval.report import compare, load_references
from mmemb.eval.results import EvalResults, Reference
from mmemb.eval.runner import evaluate, evaluate_path
from mmemb.eval.task import DatasetResult, EvalTask, Summary

__all__ = [
    "DatasetResult",
    "EncodedDataset",
    "EvalResults",
    "EvalTask",
    "GroupScore",
    "Reference",
    "Summary",
    "compare",
    "evaluate",
    "evaluate_path",
    "load_references",
]

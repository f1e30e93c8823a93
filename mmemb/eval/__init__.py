"""Evaluation: the MMEB protocol and global retrieval, with an embedding cache and reports.

    >>> from mmemb.eval import evaluate                      # doctest: +SKIP
    >>> res = evaluate(encoder, ["data/mmeb_eval"], out="results/", cache_dir="results/cache")
    >>> res.overall, res.scores["ImageNet-1K"], res.group("IND").metrics
    >>> print(res.to_markdown())

Modules: `runner` (evaluate, evaluate_path), `inputs` (eval data -> one job per dataset; the
model argument), `encoding` (dedup + sharded encoding), `cache`
(fingerprints, on-disk cache), `metrics` (P@1, top-k, Recall/MRR/NDCG), `mmeb_groups` (the 36
datasets, meta-tasks, IND/OOD), `results` (EvalResults), `report` (markdown, references, compare),
`task` (the protocol eval-task plugins implement). The tasks themselves (``mmeb``, ``retrieval``)
are plugins in the ``eval_task`` registry.
"""

from mmemb.eval.encoding import EncodedDataset
from mmemb.eval.mmeb_groups import GroupScore
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

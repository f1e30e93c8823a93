"""Evaluation tasks: the MMEB protocol (P@1 over each query's candidates) and global retrieval.

Registered through the entry point ``eval = "mmemb_eval"`` like any third-party plugin; the kernel
runner (`mmemb.eval`) reaches them only through the ``eval_task`` registry.
"""

from __future__ import annotations

import mmemb
from mmemb.plugins import Registrar
from mmemb_eval.mmeb import MMEBConfig, MMEBTask
from mmemb_eval.retrieval import RetrievalConfig, RetrievalTask

__all__ = ["MMEBConfig", "MMEBTask", "RetrievalConfig", "RetrievalTask"]


@mmemb.hookimpl
def mmemb_register_eval_tasks(registry: Registrar) -> None:
    registry.add(
        "mmeb", MMEBTask, config=MMEBConfig,
        summary="MMEB protocol: Precision@1 of each query over its own candidate list; "
                "meta-task, IND/OOD and overall means",
    )
    registry.add(
        "retrieval", RetrievalTask, config=RetrievalConfig,
        summary="global retrieval over each dataset's pooled candidates: Recall@k, MRR@10, NDCG@10",
    )

"""Metric maths on embeddings: MMEB Precision@1 over per-query candidate lists, global retrieval.

Everything here works on plain arrays, so it is tested against hand-computed cases without a model.

**Ties (MMEB).** The reference implementation (VLM2Vec's ``eval.py``) scores a query's candidates
with ``np.dot`` on float32 embeddings and takes ``np.argmax`` over the list with the positive first;
``argmax`` returns the first maximum, so a negative that exactly ties the positive counts as a
*hit*. We follow it, stated without reference to positions: a query is a hit when its positive's
score is ``>=`` every negative's. That is the same rule when the positive is first and stays well
defined when a caller's list has the positive elsewhere. Identical candidates (same text, image and
instruction) are scored once and share the score, as the reference does by keying embeddings on
(text, image), so a duplicate of the positive ties it exactly. Every tie is counted and reported,
together with the strict score (ties counted as misses), so a tie-inflated number is visible.

**Retrieval.** Top-k by inner product over a shared corpus, chunked over queries and corpus so
memory is ``O(query_chunk x corpus_chunk)`` whatever the corpus size (faiss's exact inner-product
index is used when installed and asked for). Ties are broken towards the lower corpus index, so the
result does not depend on chunk sizes. Recall@k, MRR@k and NDCG@k with binary relevance and the
``trec_eval`` gain (``rel / log2(rank + 1)``), all in percent.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mmemb.errors import ConfigError, DataError

TiePolicy = Literal["hit", "miss"]


@dataclass(frozen=True)
class P1Outcome:
    """Counts behind Precision@1: `hits` under the chosen tie rule, `tied` queries whose positive's
    score equals the best negative's (their outcome is decided by the tie rule), `total` queries."""

    hits: int
    tied: int
    total: int
    ties: TiePolicy = "hit"

    @property
    def precision(self) -> float:
        """Precision@1 in percent under `ties`."""
        return 100.0 * self.hits / self.total if self.total else float("nan")

    @property
    def precision_ties_hit(self) -> float:
        """Precision@1 in percent, ties counted as hits (the reference implementation's rule)."""
        hits = self.hits if self.ties == "hit" else self.hits + self.tied
        return 100.0 * hits / self.total if self.total else float("nan")

    @property
    def precision_ties_miss(self) -> float:
        """Precision@1 in percent, ties counted as misses (the strict reading)."""
        hits = self.hits - self.tied if self.ties == "hit" else self.hits
        return 100.0 * hits / self.total if self.total else float("nan")


def rank_outcome(scores: np.ndarray | Sequence[float], positive: int = 0) -> tuple[bool, bool]:
    """(hit, tied) for one query: hit when the positive scores >= every other candidate.

    `tied` is True when some other candidate's score equals the positive's and none is higher.
    Raises `DataError` for an empty list, a positive index out of range, or non-finite scores.
    """
    s = np.asarray(scores)
    if s.ndim != 1 or s.size == 0:
        raise DataError(
            "a query has an empty candidate list (shape "
            f"{s.shape}): Precision@1 needs at least the positive. Check the eval data: every "
            "sample must carry its positive (`pos`) and its negatives (`negs`)."
        )
    if not -s.size <= positive < s.size:
        raise DataError(
            f"positive index {positive} is outside the candidate list of {s.size} candidates"
        )
    if not np.isfinite(s).all():
        raise DataError(
            "non-finite similarity scores (NaN/inf): the model produced NaN or inf embeddings. "
            "Check the checkpoint, or evaluate in float32 (--precision fp32)."
        )
    pos = s[positive]
    others = np.delete(s, positive)
    if others.size == 0:
        return True, False
    best_other = others.max()
    return bool(pos >= best_other), bool(pos == best_other)


def precision_at_1(
    score_lists: Iterable[np.ndarray | Sequence[float]],
    positives: Iterable[int] | None = None,
    *,
    ties: TiePolicy = "hit",
) -> P1Outcome:
    """Precision@1 over queries, each given by the scores of its own candidate list.

    `positives[i]` is the index of query i's positive (default 0: the MMEB layout).
    """
    if ties not in ("hit", "miss"):
        raise ConfigError([f"ties: expected 'hit' or 'miss' (got {ties!r})"])
    hits = tied = total = 0
    pos_iter = iter(positives) if positives is not None else None
    for scores in score_lists:
        positive = next(pos_iter) if pos_iter is not None else 0
        hit, tie = rank_outcome(scores, positive)
        total += 1
        tied += tie
        hits += hit and not (tie and ties == "miss")
    return P1Outcome(hits=hits, tied=tied, total=total, ties=ties)


def candidate_list_scores(
    queries: np.ndarray,
    targets: np.ndarray,
    query_index: np.ndarray,
    cand_offsets: np.ndarray,
    cand_index: np.ndarray,
    *,
    budget: int = 1 << 24,
) -> Iterable[np.ndarray]:
    """Yield, sample by sample, the float32 scores of its candidates (positive first).

    `queries` (Nq, D) and `targets` (Nt, D) hold the *unique* items' embeddings; sample i's query is
    ``queries[query_index[i]]``, its candidates
    ``targets[cand_index[cand_offsets[i]:cand_offsets[i+1]]]``. Each (query, target) pair is scored
    once, so duplicate candidates tie exactly. When scoring every unique query against every unique
    target costs little more than scoring the lists themselves (classification sets share one
    label list), blocks of the full matrix are computed; otherwise each list is scored on its own.
    Memory stays within about `budget` floats either way.
    """
    n_samples = len(query_index)
    if len(cand_offsets) != n_samples + 1:
        raise ValueError("cand_offsets must have one more entry than query_index")
    total_cands = int(cand_offsets[-1]) if n_samples else 0
    nq, nt = len(queries), len(targets)
    if n_samples == 0:
        return
    full_matrix = nq * nt <= max(4 * total_cands, 1 << 16)
    if full_matrix:
        # Blocks of unique queries x all unique targets; each sample then indexes its row. The
        # per-sample score arrays together are as large as `cand_index`, which is already held.
        rows = max(1, budget // max(nt, 1))
        t = np.asarray(targets, dtype=np.float32)
        order = np.argsort(query_index, kind="stable")
        block_of = query_index[order] // rows
        out: dict[int, np.ndarray] = {}
        start = 0
        for block in np.unique(block_of):
            stop = start + int(np.searchsorted(block_of[start:], block, side="right"))
            lo = int(block) * rows
            s = np.asarray(queries[lo : lo + rows], dtype=np.float32) @ t.T
            for i in order[start:stop]:
                a, b = int(cand_offsets[i]), int(cand_offsets[i + 1])
                out[int(i)] = s[int(query_index[i]) - lo, cand_index[a:b]]
            start = stop
        for i in range(n_samples):
            yield out.pop(i)
        return
    for i in range(n_samples):
        a, b = int(cand_offsets[i]), int(cand_offsets[i + 1])
        cands = cand_index[a:b]
        uniq, inverse = np.unique(cands, return_inverse=True)
        q = np.asarray(queries[int(query_index[i])], dtype=np.float32)
        s_u = np.asarray(targets[uniq], dtype=np.float32) @ q
        yield s_u[inverse]


# --- global retrieval ---------------------------------------------------------------------------


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _order_rows(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (score descending, index ascending)."""
    idx_sorted, perm = idx.sort(dim=1, stable=True)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx_sorted.gather(1, perm)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row with ties at the k-th place going to the lower column index."""
    vals, idx = torch.topk(scores, k, dim=1)
    # topk picks an arbitrary subset of values tied at the k-th place; rows where more columns
    # reach the k-th value than fit are redone with a stable sort (rare outside degenerate models).
    ambiguous = ((scores >= vals[:, -1:]).sum(dim=1) > k).nonzero().flatten()
    if ambiguous.numel():
        full = torch.sort(scores[ambiguous], dim=1, descending=True, stable=True)
        vals[ambiguous] = full.values[:, :k]
        idx[ambiguous] = full.indices[:, :k]
    return _order_rows(vals, idx)


def topk_search(
    queries: np.ndarray | torch.Tensor,
    corpus: np.ndarray | torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    corpus_chunk: int = 65536,
    backend: Literal["auto", "torch", "faiss"] = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores (Q, k'), corpus indices (Q, k')), k' = min(k, N).

    Never builds the (Q, N) score matrix: queries go in chunks of `query_chunk` and, per chunk, the
    corpus in chunks of `corpus_chunk` with a running top-k, so memory is bounded by
    ``query_chunk * corpus_chunk`` scores. `corpus` may be a memory-mapped array (it is read chunk
    by chunk). `backend="faiss"` uses faiss's exact inner-product index (corpus held in RAM);
    "auto" picks faiss when it is installed. Rows are ordered by score, ties by lower index.
    """
    if k < 1:
        raise ConfigError([f"k: must be >= 1 (got {k})"])
    if query_chunk < 1 or corpus_chunk < 1:
        raise ConfigError([
            f"query_chunk/corpus_chunk must be >= 1 (got {query_chunk}, {corpus_chunk})"
        ])
    n_q, n_c = len(queries), len(corpus)
    if n_c == 0:
        raise DataError("the retrieval corpus is empty: there is nothing to rank queries against")
    k_eff = min(k, n_c)
    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    if use_faiss:
        return _faiss_topk(
            queries, corpus, k_eff, query_chunk=query_chunk, corpus_chunk=corpus_chunk
        )
    out_vals = np.empty((n_q, k_eff), dtype=np.float32)
    out_idx = np.empty((n_q, k_eff), dtype=np.int64)
    for qa in range(0, n_q, query_chunk):
        q = _as_tensor(queries[qa : qa + query_chunk])
        best_v: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for ca in range(0, n_c, corpus_chunk):
            c = _as_tensor(corpus[ca : ca + corpus_chunk])
            s = q @ c.T
            if not torch.isfinite(s).all():
                raise DataError(
                    "non-finite similarity scores (NaN/inf): the model produced NaN or inf "
                    "embeddings. Check the checkpoint, or evaluate in float32 (--precision fp32)."
                )
            v, i = _chunk_topk(s, min(k_eff, s.shape[1]))
            i = i + ca
            if best_v is None or best_i is None:
                best_v, best_i = v, i
            else:
                # Earlier chunks hold lower indices and each part is (score desc, index asc):
                # a stable sort of the concatenation keeps lower indices first among ties.
                cat_v, cat_i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
                cat_v, perm = cat_v.sort(dim=1, descending=True, stable=True)
                best_v, best_i = cat_v[:, :k_eff], cat_i.gather(1, perm)[:, :k_eff]
        assert best_v is not None and best_i is not None
        out_vals[qa : qa + len(q)] = best_v.numpy()
        out_idx[qa : qa + len(q)] = best_i.numpy()
    return out_vals, out_idx


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32)
    # A copy of the chunk (bounded size): memory-mapped cache files are read-only, and torch
    # must not wrap a read-only buffer.
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))


def _faiss_topk(
    queries: np.ndarray | torch.Tensor, corpus: np.ndarray | torch.Tensor, k: int, *,
    query_chunk: int, corpus_chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    dim = corpus.shape[1]
    index = faiss.IndexFlatIP(dim)
    for ca in range(0, len(corpus), corpus_chunk):
        index.add(_as_tensor(corpus[ca : ca + corpus_chunk]).numpy())
    vals = np.empty((len(queries), k), dtype=np.float32)
    idx = np.empty((len(queries), k), dtype=np.int64)
    for qa in range(0, len(queries), query_chunk):
        q = _as_tensor(queries[qa : qa + query_chunk]).numpy()
        if not np.isfinite(q).all():
            raise DataError("non-finite query embeddings (NaN/inf): check the checkpoint")
        v, i = index.search(q, k)
        v_t, i_t = _order_rows(torch.from_numpy(v), torch.from_numpy(i.astype(np.int64)))
        vals[qa : qa + len(q)] = v_t.numpy()
        idx[qa : qa + len(q)] = i_t.numpy()
    return vals, idx


def retrieval_metrics_per_query(
    ranked: np.ndarray,
    relevant: Sequence[Collection[int]],
    *,
    recall_at: Sequence[int] = (1, 5, 10),
    mrr_at: int = 10,
    ndcg_at: int = 10,
) -> dict[str, np.ndarray]:
    """Per-query metrics (fractions in [0, 1]) from ranked corpus indices (Q, k) and qrels.

    `relevant[i]` is the set of corpus indices relevant to query i (binary relevance). Recall@k is
    the fraction of them in the top k; MRR@k the reciprocal rank of the first one within k (0 if
    none); NDCG@k uses gain 1/log2(rank+1), normalised by the ideal ranking of min(|rel|, k) hits.
    A query with no relevant document is an error (its metrics are undefined).
    """
    n_q = len(ranked)
    if len(relevant) != n_q:
        raise ValueError(f"{len(relevant)} qrels rows for {n_q} ranked queries")
    need = max([*recall_at, mrr_at, ndcg_at])
    # Fewer than `need` columns is fine: it means the corpus is smaller than k, all of it ranked.
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a (Q, k) matrix of corpus indices (got {ranked.shape})")
    out = {f"recall@{k}": np.zeros(n_q) for k in recall_at}
    out[f"mrr@{mrr_at}"] = np.zeros(n_q)
    out[f"ndcg@{ndcg_at}"] = np.zeros(n_q)
    discounts = 1.0 / np.log2(np.arange(2, need + 2))
    for i, rel in enumerate(relevant):
        if not rel:
            raise DataError(f"query {i} has no relevant document in the qrels")
        rel_set = set(int(r) for r in rel)
        row = ranked[i]
        top = row[:need]
        is_rel = np.fromiter((int(d) in rel_set for d in top), dtype=bool, count=len(top))
        for k in recall_at:
            out[f"recall@{k}"][i] = is_rel[:k].sum() / len(rel_set)
        first = np.flatnonzero(is_rel[:mrr_at])
        out[f"mrr@{mrr_at}"][i] = 1.0 / (first[0] + 1) if first.size else 0.0
        hits_k = is_rel[:ndcg_at]
        dcg = float((hits_k * discounts[: len(hits_k)]).sum())
        idcg = float(discounts[: min(len(rel_set), ndcg_at)].sum())
        out[f"ndcg@{ndcg_at}"][i] = dcg / idcg
    return out


def retrieval_metrics(
    ranked: np.ndarray,
    relevant: Sequence[Collection[int]],
    *,
    recall_at: Sequence[int] = (1, 5, 10),
    mrr_at: int = 10,
    ndcg_at: int = 10,
) -> dict[str, float]:
    """Means over queries of `retrieval_metrics_per_query`, in percent."""
    per_query = retrieval_metrics_per_query(
        ranked, relevant, recall_at=recall_at, mrr_at=mrr_at, ndcg_at=ndcg_at
    )
    return {
        name: (100.0 * float(v.mean()) if len(v) else math.nan) for name, v in per_query.items()
    }

"""Metric maths against hand-computed cases: P@1 with ties and shuffled positives, chunked top-k,
Recall/MRR/NDCG."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmemb.errors import DataError
from mmemb.eval.metrics import (
    candidate_list_scores,
    precision_at_1,
    rank_outcome,
    retrieval_metrics,
    retrieval_metrics_per_query,
    topk_search,
)


def test_precision_at_1_hand_computed_with_a_tie() -> None:
    lists = [
        [0.9, 0.1, 0.3],  # positive best: hit
        [0.2, 0.5, 0.1],  # a negative beats it: miss
        [0.4, 0.4, 0.0],  # exact tie with a negative: hit under the reference rule
        [0.7],            # no negatives: hit
    ]
    ref = precision_at_1(lists)
    assert (ref.hits, ref.tied, ref.total) == (3, 1, 4)
    assert ref.precision == pytest.approx(75.0)
    assert ref.precision_ties_miss == pytest.approx(50.0)
    strict = precision_at_1(lists, ties="miss")
    assert (strict.hits, strict.tied) == (2, 1)
    assert strict.precision == pytest.approx(50.0)
    assert strict.precision_ties_hit == pytest.approx(75.0)


def test_positive_not_first_after_shuffling() -> None:
    # Positive at index 2: hit iff it is >= every other score, wherever it sits.
    assert rank_outcome([0.1, 0.3, 0.8, 0.2], positive=2) == (True, False)
    assert rank_outcome([0.1, 0.9, 0.8, 0.2], positive=2) == (False, False)
    assert rank_outcome([0.8, 0.3, 0.8], positive=2) == (True, True)
    # Shuffling a list (and moving the positive index with it) never changes the outcome.
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, size=6).astype(np.float32)  # small range: many ties
        perm = rng.permutation(6)
        shuffled = scores[perm]
        new_pos = int(np.flatnonzero(perm == 0)[0])
        assert rank_outcome(shuffled, new_pos) == rank_outcome(scores, 0)
    p = precision_at_1([[0.1, 0.3, 0.8], [0.9, 0.3, 0.2]], positives=[2, 1])
    assert (p.hits, p.total) == (1, 2)


def test_tie_rule_equals_vlm2vec_argmax_with_positive_first() -> None:
    rng = np.random.default_rng(1)
    lists = [rng.integers(0, 3, size=rng.integers(1, 8)).astype(np.float32) for _ in range(300)]
    ours = precision_at_1(lists)
    reference_hits = sum(int(np.argmax(s) == 0) for s in lists)
    assert ours.hits == reference_hits
    assert ours.tied > 0  # the case matters in this sample


def test_empty_candidate_list_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="empty candidate list"):
        precision_at_1([[0.5, 0.1], []])
    with pytest.raises(DataError, match="outside the candidate list"):
        rank_outcome([0.5, 0.1], positive=2)
    with pytest.raises(DataError, match="non-finite"):
        rank_outcome([float("nan"), 0.1])


def _naive_scores(
    q: np.ndarray, t: np.ndarray, qi: np.ndarray, off: np.ndarray, ci: np.ndarray
) -> list[np.ndarray]:
    return [t[ci[off[i] : off[i + 1]]] @ q[qi[i]] for i in range(len(qi))]


@pytest.mark.parametrize("shared", [True, False], ids=["full-matrix-path", "per-list-path"])
def test_candidate_list_scores_match_naive_and_duplicates_tie(shared: bool) -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    n_t = 6 if shared else 5000  # a large target table with short lists takes the per-list path
    t = rng.standard_normal((n_t, 8)).astype(np.float32)
    qi = np.array([0, 1, 2, 3, 4, 0])
    lists = [[0, 1, 2], [1, 0, 3, 1], [2, 5], [3, 4, 0, 1, 2, 5], [4, 4], [5, 0]]
    off = np.cumsum([0] + [len(c) for c in lists])
    ci = np.concatenate(lists)
    got = list(candidate_list_scores(q, t, qi, off, ci))
    want = _naive_scores(q, t, qi, off, ci)
    assert len(got) == 6
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # A duplicate of the positive (same target row) scores exactly the same: a counted tie, a hit.
    assert got[4][0] == got[4][1] and got[1][0] == got[1][3]
    out = precision_at_1(candidate_list_scores(q, t, qi, off, ci))
    assert out.tied >= 1


def _stable_full_topk(q: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    s = q @ c.T
    # lexsort: last key is primary -> score descending, then index ascending
    idx = np.arange(c.shape[0])
    return np.stack([np.lexsort((idx, -row))[:k] for row in s])


@pytest.mark.parametrize("qc,cc", [(1, 1), (3, 4), (7, 5), (100, 1000)])
def test_chunked_topk_equals_full_sort_with_ties(qc: int, cc: int) -> None:
    rng = np.random.default_rng(3)
    # Integer embeddings make exact ties common, including at the k-th place.
    q = rng.integers(-2, 3, size=(13, 4)).astype(np.float32)
    c = rng.integers(-2, 3, size=(37, 4)).astype(np.float32)
    vals, idx = topk_search(q, c, 6, query_chunk=qc, corpus_chunk=cc, backend="torch")
    want = _stable_full_topk(q, c, 6)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(vals, np.take_along_axis(q @ c.T, want, 1))


def test_topk_reads_a_memory_mapped_corpus_and_caps_k(tmp_path) -> None:
    rng = np.random.default_rng(4)
    c = rng.standard_normal((20, 3)).astype(np.float32)
    np.save(tmp_path / "c.npy", c)
    mm = np.load(tmp_path / "c.npy", mmap_mode="r")
    q = rng.standard_normal((4, 3)).astype(np.float32)
    _, idx = topk_search(q, mm, 50, corpus_chunk=6)
    assert idx.shape == (4, 20)  # k larger than the corpus: everything, ranked
    np.testing.assert_array_equal(idx, _stable_full_topk(q, c, 20))
    with pytest.raises(DataError, match="corpus is empty"):
        topk_search(q, np.empty((0, 3), np.float32), 5)


def test_topk_faiss_agrees_with_torch() -> None:
    pytest.importorskip("faiss", reason="faiss is an optional extra (mmemb[faiss])")
    rng = np.random.default_rng(5)
    q = rng.standard_normal((9, 8)).astype(np.float32)
    c = rng.standard_normal((300, 8)).astype(np.float32)
    _, a = topk_search(q, c, 10, backend="torch")
    _, b = topk_search(q, c, 10, backend="faiss")
    np.testing.assert_array_equal(a, b)


def test_retrieval_metrics_hand_computed() -> None:
    ranked = np.array([
        [3, 1, 2, 0, 4, 5, 6, 7, 8, 9, 10],  # relevant {1}: first hit at rank 2
        [3, 1, 2, 0, 4, 5, 6, 7, 8, 9, 10],  # relevant {1, 0}: ranks 2 and 4
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0],  # relevant {0}: rank 11, outside every cut-off
    ])
    per = retrieval_metrics_per_query(ranked, [{1}, {1, 0}, {0}])
    assert per["recall@1"].tolist() == [0.0, 0.0, 0.0]
    assert per["recall@5"].tolist() == [1.0, 1.0, 0.0]
    assert per["recall@10"].tolist() == [1.0, 1.0, 0.0]
    assert per["mrr@10"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    ndcg1 = 1 / math.log2(3)
    ndcg2 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert per["ndcg@10"].tolist() == pytest.approx([ndcg1, ndcg2, 0.0])
    means = retrieval_metrics(ranked, [{1}, {1, 0}, {0}])
    assert means["recall@5"] == pytest.approx(200 / 3)
    assert means["ndcg@10"] == pytest.approx(100 * (ndcg1 + ndcg2) / 3)
    # Recall@1 with two relevant documents and the first one ranked first is 1/2.
    assert retrieval_metrics_per_query(np.array([[0, 1]]), [{0, 5}])["recall@1"][0] == 0.5


def test_query_without_relevant_document_is_an_error() -> None:
    with pytest.raises(DataError, match="no relevant document"):
        retrieval_metrics(np.array([[0, 1]]), [set()])

"""`mmemb mine` against sentence-transformers' `mine_hard_negatives` on the same small corpus and
the same tiny BERT (loaded by both from one directory): the same negatives, in the same order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mmemb_hf.tiny import make_tiny_text_model

from mmemb import plugins
from mmemb.data.schema import Item, Sample
from mmemb.data.shards import ShardWriter, iter_samples, write_json_atomic
from mmemb.mine import mine
from mmemb.model import Encoder
from mmemb.testing.corpus import caption_corpus

st = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")


# Only the plugins these tests use (others may be mid-change without breaking them).
pytestmark = pytest.mark.only_plugins("mmemb_hf", "mmemb_mining")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("bert"), seed=1)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    lines = list(dict.fromkeys(caption_corpus(400, seed=5)))
    out = [(lines[i], lines[100 + i]) for i in range(80)]
    out[1] = (out[0][0], out[1][1])  # a query with two positives
    out[7] = (out[7][0], out[3][1])  # a positive shared by two queries
    return out


def _mmemb(model_dir: Path, pairs: list[tuple[str, str]], tmp: Path,
           miner: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """Negatives per (query, positive); samples left short are dropped (as ST's n-tuples are)."""
    data = tmp / "data"
    with ShardWriter(data) as w:
        for i, (q, p) in enumerate(pairs):
            w.write(Sample(id=f"{i:03d}", dataset="d", query=Item(text=q), pos=Item(text=p)))
    write_json_atomic(data / "manifest.json",
                      w.manifest(read=len(pairs), written=len(pairs), rejected={}))
    encoder = Encoder(plugins.build("backbone", "hf_text", path=str(model_dir)),
                      plugins.build("pooler", "mean"))
    mine(encoder, data, tmp / "out", miner={"name": "knn", **miner}, echo=lambda s: None)
    return {(str(s.query.text), str(s.pos.text)): [str(n.text) for n in s.negs]
            for s in iter_samples(tmp / "out")}


def _st(model_dir: Path, pairs: list[tuple[str, str]],
        **kw: Any) -> dict[tuple[str, str], list[str]]:
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    ds = datasets.Dataset.from_dict({"query": [q for q, _ in pairs],
                                     "pos": [p for _, p in pairs]})
    out = st.util.mine_hard_negatives(ds, model, output_format="n-tuple", verbose=False,
                                      batch_size=16, **kw)
    # n-tuple rows come grouped by unique query: key them by pair
    return {(r["query"], r["pos"]): [r[k] for k in r if k.startswith("negative_")]
            for r in out.to_list()}


def test_filters_off_same_negatives_as_sentence_transformers(
    model_dir: Path, pairs: list[tuple[str, str]], tmp_path: Path
) -> None:
    want = _st(model_dir, pairs, num_negatives=3)
    got = _mmemb(model_dir, pairs, tmp_path,
                 {"num_negatives": 3, "rank_end": 3, "relative_margin": None})
    assert got == want
    assert len(got) == len(pairs) and all(len(n) == 3 for n in got.values())
    q0 = [got[pairs[0]], got[pairs[1]]]  # one query, two positives: neither is its negative
    assert q0[0] == q0[1] and not {pairs[0][1], pairs[1][1]} & set(q0[0])


def test_window_and_filters_same_negatives_when_st_searches_the_whole_corpus(
    model_dir: Path, pairs: list[tuple[str, str]], tmp_path: Path
) -> None:
    # sentence-transformers' window counts survivors among the range_max + positives it
    # searched; with range_max covering the corpus that is mmemb's exact semantics.
    want = _st(model_dir, pairs, num_negatives=2, range_min=3, range_max=len(pairs),
               relative_margin=0.01, max_score=0.99)
    got = _mmemb(model_dir, pairs, tmp_path,
                 {"num_negatives": 2, "rank_start": 3, "rank_end": 5, "relative_margin": 0.01,
                  "max_score": 0.99})
    assert got == want
    assert len(pairs) // 2 < len(got) < len(pairs)  # the filters bite: some samples run short

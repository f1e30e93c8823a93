"""Mining: the knn and random miners on hand-built rankings, then `mine` end to end on shards with
a tiny text model, checked against a brute-force reading of the documented semantics.
(`mine` against sentence-transformers' `mine_hard_negatives` is in test_mining_st.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mmemb_hf.tiny import make_tiny_text_model

from mmemb import plugins
from mmemb.data.schema import Item, Sample
from mmemb.data.shards import ShardWriter, iter_samples, read_manifest, write_json_atomic
from mmemb.encoder_io import save_encoder
from mmemb.errors import ConfigError, DataError
from mmemb.mine import Ranked, mine
from mmemb.model import Encoder
from mmemb.testing.corpus import caption_corpus

# Only the plugins these tests use (others may be mid-change without breaking them).
pytestmark = pytest.mark.only_plugins("mmemb_hf", "mmemb_mining")


def ranked(*, complete: bool = True, pos: float = 0.80) -> Ranked:
    # pool index 7 is the positive (already removed from the list); the others in rank order
    return Ranked(
        indices=[3, 1, 9, 4, 2, 8],
        scores=[0.90, 0.77, 0.70, 0.60, 0.50, 0.40],
        pos_score=pos,
        positives=frozenset({7}),
        complete=complete,
    )


def knn(**kw: object) -> object:
    return plugins.build("miner", "knn", **kw)


def test_knn_window_counts_only_candidates_that_survive_the_filters() -> None:
    # relative_margin 0.05 drops s > 0.80 - 0.04 = 0.76: 3 and 1. The window [1, 3) then counts
    # survivors 9 (rank 0), 4 (rank 1), 2 (rank 2): the filtered ones take no slot.
    miner = knn(num_negatives=2, rank_start=1, rank_end=3, relative_margin=0.05)
    c = miner.choose(ranked(), pool_size=10, rng=random.Random(0))
    assert c is not None and c.indices == [4, 2] and c.scores == [0.60, 0.50]
    assert c.skipped == {"relative_margin": 2}


def test_relative_margin_is_right_for_a_negative_positive_score() -> None:
    # s_pos = -0.2, margin 0.1: drop s > -0.22. The old ratio rule (s > 0.9 * s_pos = -0.18)
    # would have kept -0.21, which is closer to the query than allowed.
    r = Ranked(indices=[1, 2, 3], scores=[-0.21, -0.25, -0.30], pos_score=-0.2,
               positives=frozenset({0}), complete=True)
    c = knn(num_negatives=2, rank_end=5, relative_margin=0.1).choose(
        r, pool_size=4, rng=random.Random(0))
    assert c is not None and c.indices == [2, 3] and c.skipped == {"relative_margin": 1}


def test_absolute_margin_max_and_min_score() -> None:
    c = knn(num_negatives=5, rank_end=6, relative_margin=None, margin=0.15).choose(
        ranked(), pool_size=10, rng=random.Random(0))  # drop s > 0.65
    assert c is not None and c.indices == [4, 2, 8] and c.skipped == {"margin": 3}
    c = knn(num_negatives=5, rank_end=6, relative_margin=None, max_score=0.75,
            min_score=0.45).choose(ranked(complete=False), pool_size=10, rng=random.Random(0))
    # 0.90 and 0.77 above max_score; 0.40 below min_score ends the list, deeper ones are lower
    assert c is not None and c.indices == [9, 4, 2] and c.skipped == {"max_score": 2}


def test_knn_asks_for_a_deeper_search_only_when_more_can_exist() -> None:
    miner = knn(num_negatives=2, rank_start=2, rank_end=4, relative_margin=0.05)
    # survivors 9, 4, 2, 8: 4 of 4 needed -> decided
    assert miner.choose(ranked(complete=False), pool_size=99, rng=random.Random(0)) is not None
    miner = knn(num_negatives=2, rank_start=3, rank_end=5, relative_margin=0.05)
    assert miner.choose(ranked(complete=False), pool_size=99, rng=random.Random(0)) is None
    c = miner.choose(ranked(complete=True), pool_size=7, rng=random.Random(0))
    assert c is not None and c.indices == [8]  # the whole pool is there: short, not deeper


def test_knn_sampling_is_seeded_sorted_and_within_the_window() -> None:
    miner = knn(num_negatives=2, rank_start=1, rank_end=6, relative_margin=None, sample=True)
    a = miner.choose(ranked(), pool_size=10, rng=random.Random(1))
    b = miner.choose(ranked(), pool_size=10, rng=random.Random(1))
    assert a is not None and b is not None and a.indices == b.indices
    assert set(a.indices) <= {1, 9, 4, 2, 8} and a.scores == sorted(a.scores, reverse=True)
    seen = set()
    for seed in range(40):
        c = miner.choose(ranked(), pool_size=10, rng=random.Random(seed))
        assert c is not None
        seen |= set(c.indices)
    assert seen == {1, 9, 4, 2, 8}


def test_knn_config_errors_and_the_old_ratio_option() -> None:
    with pytest.raises(ConfigError, match="rank_end .* must exceed rank_start"):
        knn(rank_start=5, rank_end=5)
    with pytest.raises(ConfigError, match=r"num_negatives \(4\) does not fit .*at least 6"):
        knn(num_negatives=4, rank_start=2, rank_end=5)
    with pytest.raises(ConfigError, match="not both"):
        knn(max_pos_ratio=0.9, relative_margin=0.1)
    assert knn(max_pos_ratio=0.9).config.relative_margin == pytest.approx(0.1)
    assert knn(max_pos_ratio=None).config.relative_margin is None


def test_random_never_returns_a_positive() -> None:
    miner = plugins.build("miner", "random", num_negatives=4)
    for seed in range(50):
        got = miner.choose(Ranked([], [], None, frozenset({2, 5}), complete=False),
                           pool_size=7, rng=random.Random(seed)).indices
        assert len(got) == 4 and not {2, 5} & set(got) and len(set(got)) == 4


# --- mine end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    path = make_tiny_text_model(tmp_path_factory.mktemp("bert"), seed=1)
    return Encoder(plugins.build("backbone", "hf_text", path=str(path)),
                   plugins.build("pooler", "mean"))


LINES = list(dict.fromkeys(caption_corpus(300, seed=4)))[:140]


def _shards(path: Path, samples: list[Sample]) -> Path:
    with ShardWriter(path) as w:
        for s in samples:
            w.write(s)
    write_json_atomic(path / "manifest.json", w.manifest(read=len(samples),
                                                         written=len(samples), rejected={}))
    return path


def _pairs(n: int = 40) -> list[Sample]:
    # query i -> positive LINES[60 + i]; samples 0 and 1 share their query (two positives)
    out = [Sample(id=str(i), dataset="d", query=Item(text=LINES[i]), pos=Item(text=LINES[60 + i]))
           for i in range(n)]
    out[1] = Sample(id="1", dataset="d", query=Item(text=LINES[0]), pos=Item(text=LINES[61]))
    return out


def _brute_force(encoder: Encoder, samples: list[Sample], *, rank_start: int, rank_end: int,
                 num: int, relative_margin: float | None, max_score: float | None
                 ) -> dict[str, list[str]]:
    """The documented semantics, computed on the full score matrix."""
    pool = list(dict.fromkeys(s.pos.text for s in samples))
    emb_p = encoder.encode([Item(text=t) for t in pool], side="target")
    by_query: dict[str, set[int]] = {}
    for s in samples:
        by_query.setdefault(str(s.query.text), set()).add(pool.index(str(s.pos.text)))
    out = {}
    for s in samples:
        q = encoder.encode([s.query], side="query")[0]
        sims = (emb_p @ q).tolist()
        pos = by_query[str(s.query.text)]
        s_pos = min(sims[j] for j in pos)
        order = sorted((j for j in range(len(pool)) if j not in pos), key=lambda j: -sims[j])
        keep = [j for j in order
                if not (relative_margin is not None
                        and sims[j] > s_pos - abs(s_pos) * relative_margin)
                and not (max_score is not None and sims[j] > max_score)]
        out[s.id] = [pool[j] for j in keep[rank_start:rank_end][:num]]
    return out


@pytest.mark.parametrize("rank_start,rank_end,relative_margin,max_q", [
    (0, 3, None, None),      # filters off
    (2, 6, 0.01, 0.7),       # both filters bite: deeper searches needed
])
def test_mine_matches_the_brute_force_semantics(
    encoder: Encoder, tmp_path: Path, rank_start: int, rank_end: int,
    relative_margin: float | None, max_q: float | None,
) -> None:
    samples = _pairs()
    data = _shards(tmp_path / "data", samples)
    max_score = None
    if max_q is not None:  # a score threshold that drops ~30 % of all candidates
        q = encoder.encode([s.query for s in samples], side="query")
        p = encoder.encode([s.pos for s in samples], side="target")
        max_score = float(np.quantile((q @ p.T).numpy(), max_q))
    miner = {"name": "knn", "num_negatives": 3, "rank_start": rank_start, "rank_end": rank_end,
             "relative_margin": relative_margin, "max_score": max_score}
    report = mine(encoder, data, tmp_path / "out", miner=miner, on_short="keep",
                  echo=lambda s: None, batch_size=7)
    want = _brute_force(encoder, samples, rank_start=rank_start, rank_end=rank_end, num=3,
                        relative_margin=relative_margin, max_score=max_score)
    got = {s.id: [n.text for n in s.negs] for s in iter_samples(tmp_path / "out")}
    assert got == want
    stats = report.stats["d"]
    assert stats["unique_queries"] == 39 and stats["written"] == 40
    for sid in ("0", "1"):  # neither positive of the shared query is a negative of it
        assert not {LINES[60], LINES[61]} & set(got[sid])
    if max_q is not None:
        assert stats["deeper_searches"] > 0 and sum(stats["skipped_false_negatives"].values())


def test_short_samples_are_dropped_kept_or_filled(encoder: Encoder, tmp_path: Path) -> None:
    samples = _pairs(12)
    data = _shards(tmp_path / "data", samples)
    # max_score -2 drops every candidate: every sample is short after searching the whole pool
    miner = {"name": "knn", "num_negatives": 2, "rank_end": 4, "max_score": -2.0}
    lines: list[str] = []
    with pytest.raises(DataError, match="nothing to write.*--on-short fill"):
        mine(encoder, data, tmp_path / "drop", miner=miner, echo=lines.append)
    assert not (tmp_path / "drop").exists() and not (tmp_path / "drop.tmp-mine").exists()

    lines.clear()
    kept = mine(encoder, data, tmp_path / "keep", miner=miner, on_short="keep", echo=lines.append)
    assert kept.stats["d"]["kept_short"] == 12 and kept.written == 12
    assert any("negatives.min = 0, so train.negatives must be at most that" in s for s in lines)
    assert read_manifest(tmp_path / "keep")["datasets"]["d"]["negatives"]["min"] == 0

    filled = mine(encoder, data, tmp_path / "fill", miner=miner, on_short="fill",
                  echo=lambda s: None)
    assert filled.stats["d"]["filled"] == 12 and filled.stats["d"]["filled_negatives"] == 24
    by_query: dict[str, set[str]] = {}
    for s in samples:
        by_query.setdefault(str(s.query.text), set()).add(str(s.pos.text))
    for s in iter_samples(tmp_path / "fill"):
        assert len(s.negs) == 2 and not {n.text for n in s.negs} & by_query[str(s.query.text)]
    assert read_manifest(tmp_path / "fill")["datasets"]["d"]["negatives"]["min"] == 2

    # min_negatives 1 with a miner that finds 0: the same samples are short against 1
    some = mine(encoder, data, tmp_path / "fill1", miner=miner, on_short="fill",
                min_negatives=1, echo=lambda s: None)
    assert some.stats["d"]["filled_negatives"] == 12


def test_scores_corpus_and_append(encoder: Encoder, tmp_path: Path) -> None:
    samples = [Sample(id=str(i), dataset="d", query=Item(text=LINES[i]),
                      pos=Item(text=LINES[60 + i]), negs=[Item(text=LINES[100 + i])])
               for i in range(10)]
    data = _shards(tmp_path / "data", samples)
    # The corpus holds each query's own text: with no instruction it embeds exactly like the
    # query (score 1), so it must rank first.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s.query.text}) + "\n" for s in samples))
    miner = {"name": "knn", "num_negatives": 2, "rank_end": 2, "relative_margin": None}
    mine(encoder, data, tmp_path / "out", miner=miner, corpus=corpus, scores=True,
         mode="append", echo=lambda s: None)
    for s in iter_samples(tmp_path / "out"):
        i = int(s.id)
        assert s.negs[0].text == LINES[100 + i]  # append keeps the sample's own negative first
        assert s.negs[1].text == LINES[i]  # its query's copy from the corpus
        q = encoder.encode([s.query], side="query")[0]
        t = encoder.encode([s.pos, *s.negs], side="target")
        m = s.meta["mining"]
        assert m["pos_score"] == pytest.approx(float(t[0] @ q), abs=1e-5)
        assert m["neg_scores"] == pytest.approx((t[1:] @ q).tolist(), abs=1e-5)
        assert m["neg_scores"][1] == pytest.approx(1.0, abs=1e-5)
    assert read_manifest(tmp_path / "out")["mining"]["corpus_items"] == 10


def test_cli_mine_with_the_mining_options(encoder: Encoder, tmp_path: Path) -> None:
    from mmemb.cli import cli

    model = save_encoder(encoder, tmp_path / "model", backbone={"name": "hf_text", "path": "x"},
                         pooler={"name": "mean"})
    data = _shards(tmp_path / "data", _pairs(16))
    result = CliRunner().invoke(cli, [
        "mine", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
        "--arg", "num_negatives=2", "--arg", "rank_end=3", "--arg", "max_score=-2",
        "--on-short", "fill", "--scores", "--no-progress", "--seed", "3",
    ])
    assert result.exit_code == 0, result.output
    assert "16 of 16 samples got fewer than 2 negatives; 16 topped up at random" in result.output
    assert all(len(s.negs) == 2 and len(s.meta["mining"]["neg_scores"]) == 2
               for s in iter_samples(tmp_path / "out"))
    bad = CliRunner().invoke(cli, [
        "mine", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o2"),
        "--corpus", str(tmp_path / "nope.jsonl"),
    ])
    assert bad.exit_code != 0 and "nope.jsonl" in bad.output


def test_progress_is_reported_while_embedding(
    encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _shards(tmp_path / "data", _pairs(20))
    mine(encoder, data, tmp_path / "out", miner={"name": "knn", "num_negatives": 2},
         show_progress=True, batch_size=4, echo=lambda s: None)
    err = capsys.readouterr().err
    assert "mine: embed d queries 19/19" in err and "mine: embed d pool 20/20" in err

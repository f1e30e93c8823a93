"""Miners on hand-built rankings (the search is `mmemb.eval.metrics.topk_search`, tested with eval;
`mine` end to end on real shards is in test_quickstart.py)."""

from __future__ import annotations

import random

import pytest

from mmemb import plugins
from mmemb.errors import ConfigError
from mmemb.mine import MiningStats, Ranked


def ranked() -> Ranked:
    # pool index 7 is the positive (sim 0.80); the others in rank order
    return Ranked(
        indices=[3, 7, 1, 9, 4, 2, 8],
        sims=[0.90, 0.80, 0.77, 0.70, 0.60, 0.50, 0.40],
        pos_sim=0.80,
        pos_index=7,
    )


def test_knn_skips_positive_and_false_negatives_then_takes_the_window() -> None:
    stats = MiningStats()
    miner = plugins.build(
        "miner", "knn", num_negatives=2, rank_start=0, rank_end=10, max_pos_ratio=0.95
    )
    # 3 (0.90 > 0.76) and 1 (0.77 > 0.76) are likely false negatives; 9 and 4 come next.
    assert miner.choose(ranked(), pool_size=10, rng=random.Random(0), stats=stats) == [9, 4]
    assert stats.skipped_false_negatives == 2 and stats.chosen == 2 and stats.short == 0
    assert stats.neg_sim_sum == pytest.approx(1.30)


def test_knn_rank_window_and_margin() -> None:
    stats = MiningStats()
    # ranks without the positive: 3:0, 1:1, 9:2, 4:3, 2:4, 8:5 -> window [2, 5) = 9, 4, 2
    miner = plugins.build(
        "miner", "knn", num_negatives=5, rank_start=2, rank_end=5, max_pos_ratio=None, margin=0.15
    )  # drop sim > 0.65: 9
    assert miner.choose(ranked(), pool_size=10, rng=random.Random(0), stats=stats) == [4, 2]
    assert stats.short == 1 and stats.skipped_false_negatives == 1


def test_knn_sampling_is_seeded_and_within_the_window() -> None:
    miner = plugins.build(
        "miner", "knn", num_negatives=2, rank_end=6, max_pos_ratio=None, sample=True
    )
    a = miner.choose(ranked(), pool_size=10, rng=random.Random(1), stats=MiningStats())
    b = miner.choose(ranked(), pool_size=10, rng=random.Random(1), stats=MiningStats())
    assert a == b and len(set(a)) == 2 and set(a) <= {3, 1, 9, 4, 2, 8}


def test_knn_config_errors() -> None:
    with pytest.raises(ConfigError, match="rank_end .* must exceed rank_start"):
        plugins.build("miner", "knn", rank_start=5, rank_end=5)


def test_random_never_returns_the_positive() -> None:
    miner = plugins.build("miner", "random", num_negatives=4)
    rng = random.Random(0)
    for _ in range(50):
        got = miner.choose(
            Ranked([], [], 0.0, pos_index=2), pool_size=5, rng=rng, stats=MiningStats()
        )
        assert len(got) == 4 and 2 not in got and len(set(got)) == 4

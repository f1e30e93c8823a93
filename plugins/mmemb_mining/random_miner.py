"""Random negatives from the dataset's pool: the baseline mined negatives are compared with."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from mmemb.mine import MiningStats, Ranked


class RandomConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_negatives: int = Field(3, gt=0)


class RandomMiner:
    search_depth = 0  # needs no embeddings

    def __init__(self, config: RandomConfig) -> None:
        self.config = config

    def choose(
        self, ranked: Ranked, *, pool_size: int, rng: random.Random, stats: MiningStats
    ) -> list[int]:
        others = pool_size - (1 if ranked.pos_index >= 0 else 0)
        n = min(self.config.num_negatives, others)
        chosen: list[int] = []
        seen = {ranked.pos_index}
        while len(chosen) < n:
            j = rng.randrange(pool_size)
            if j not in seen:
                seen.add(j)
                chosen.append(j)
        if n < self.config.num_negatives:
            stats.short += 1
        stats.chosen += n
        return chosen

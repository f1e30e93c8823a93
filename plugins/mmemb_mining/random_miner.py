"""Random negatives from the dataset's pool: the baseline mined negatives are compared with."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from mmemb.mine import Choice, Ranked


class RandomConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_negatives: int = Field(3, gt=0)


class RandomMiner:
    search_depth = 0  # needs no embeddings

    def __init__(self, config: RandomConfig) -> None:
        self.config = config
        self.num_negatives = config.num_negatives

    def choose(self, ranked: Ranked, *, pool_size: int, rng: random.Random) -> Choice:
        n = min(self.config.num_negatives, pool_size - len(ranked.positives))
        chosen: list[int] = []
        seen = set(ranked.positives)
        # Rejection sampling: cheap while n is small against the pool, the usual case.
        while len(chosen) < n:
            j = rng.randrange(pool_size)
            if j not in seen:
                seen.add(j)
                chosen.append(j)
        return Choice(indices=chosen)

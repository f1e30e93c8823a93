"""kNN rank-window miner with positive-aware false-negative filtering.

Candidates are taken in the model's rank order (the positive itself skipped): those ranked before
`rank_start` are skipped as too likely to be unlabelled positives, and any candidate whose
similarity exceeds `max_pos_ratio · s_pos` or `s_pos − margin` is dropped as a likely false
negative (the "positive-aware" filters of Moreira et al. 2024, NV-Retriever). From what remains
inside the window `[rank_start, rank_end)`, the `num_negatives` best are taken, or a random
`num_negatives` with `sample: true`.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmemb.mine import MiningStats, Ranked


class KnnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_negatives: int = Field(3, gt=0)
    rank_start: int = Field(0, ge=0, description="skip this many top-ranked candidates")
    rank_end: int = Field(50, gt=0, description="look no deeper than this rank")
    max_pos_ratio: float | None = Field(0.95, gt=0, description="drop sim > ratio * s_pos")
    margin: float | None = Field(None, description="drop sim > s_pos - margin")
    sample: bool = False

    @model_validator(mode="after")
    def _window(self) -> KnnConfig:
        if self.rank_end <= self.rank_start:
            raise ValueError(
                f"rank_end ({self.rank_end}) must exceed rank_start ({self.rank_start})"
            )
        return self


class KnnMiner:
    def __init__(self, config: KnnConfig) -> None:
        self.config = config
        # +1: the positive itself usually ranks in the list and is skipped.
        self.search_depth = config.rank_end + 1

    def _false_negative(self, sim: float, pos_sim: float) -> bool:
        c = self.config
        if c.max_pos_ratio is not None and sim > c.max_pos_ratio * pos_sim:
            return True
        return c.margin is not None and sim > pos_sim - c.margin

    def choose(
        self, ranked: Ranked, *, pool_size: int, rng: random.Random, stats: MiningStats
    ) -> list[int]:
        c = self.config
        window: list[tuple[int, float]] = []
        rank = 0
        for idx, sim in zip(ranked.indices, ranked.sims, strict=True):
            if idx == ranked.pos_index:
                continue
            if rank >= c.rank_end:
                break
            if rank >= c.rank_start:
                if self._false_negative(sim, ranked.pos_sim):
                    stats.skipped_false_negatives += 1
                else:
                    window.append((idx, sim))
            rank += 1
        picked = (
            rng.sample(window, min(c.num_negatives, len(window)))
            if c.sample
            else window[: c.num_negatives]
        )
        if len(picked) < c.num_negatives:
            stats.short += 1
        stats.chosen += len(picked)
        stats.neg_sim_sum += sum(sim for _, sim in picked)
        return [idx for idx, _ in picked]

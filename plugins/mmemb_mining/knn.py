"""kNN rank-window miner with positive-aware false-negative filters.

Candidates come in the model's rank order, every positive of the query already removed. Each is
dropped as a likely false negative (the "positive-aware" filters of Moreira et al. 2024,
NV-Retriever) when its score ``s`` is

- ``s > s_pos - margin`` (absolute margin),
- ``s > s_pos - |s_pos| * relative_margin`` (relative margin: correct for a negative ``s_pos``,
  as sentence-transformers has it since its #3819), or
- ``s > max_score``;

and candidates below ``min_score`` end the list (they are too easy). ``s_pos`` is the lowest score
among the query's positives. The window ``[rank_start, rank_end)`` counts only the candidates
that survive the filters, so a filtered candidate never takes a slot; when a query's list runs out
first, `mmemb mine` searches deeper. From the window the ``num_negatives`` best are taken, or a
random ``num_negatives`` with ``sample: true`` (reported best first). docs/mining.md maps every
option onto sentence-transformers' `mine_hard_negatives`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmemb.mine import Choice, Ranked


class KnnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_negatives: int = Field(3, gt=0)
    rank_start: int = Field(
        0, ge=0, description="skip this many top surviving candidates (ST: range_min)"
    )
    rank_end: int = Field(
        50, gt=0, description="window end, counted in surviving candidates (ST: range_max)"
    )
    relative_margin: float | None = Field(
        0.05, ge=0, description="drop s > s_pos - |s_pos| * relative_margin"
    )
    margin: float | None = Field(
        None, description="drop s > s_pos - margin (ST: absolute_margin)"
    )
    max_score: float | None = Field(None, description="drop s > max_score")
    min_score: float | None = Field(None, description="never take s < min_score")
    sample: bool = Field(
        False, description="random negatives from the window (ST: sampling_strategy=random)"
    )
    max_pos_ratio: float | None = Field(
        None, exclude=True, description="deprecated: relative_margin = 1 - max_pos_ratio"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_ratio(cls, data: Any) -> Any:
        # `max_pos_ratio: r` (drop s > r * s_pos) was the option before `relative_margin`; it
        # reads as relative_margin = 1 - r, now also correct for a negative s_pos.
        if isinstance(data, dict) and "max_pos_ratio" in data:
            data = dict(data)
            ratio = data.pop("max_pos_ratio")
            if "relative_margin" in data:
                raise ValueError(
                    "give relative_margin or the older max_pos_ratio, not both "
                    "(max_pos_ratio r is relative_margin 1 - r)"
                )
            data["relative_margin"] = None if ratio is None else 1.0 - float(ratio)
        return data

    @model_validator(mode="after")
    def _window(self) -> KnnConfig:
        if self.rank_end <= self.rank_start:
            raise ValueError(
                f"rank_end ({self.rank_end}) must exceed rank_start ({self.rank_start})"
            )
        if self.num_negatives > self.rank_end - self.rank_start:
            raise ValueError(
                f"num_negatives ({self.num_negatives}) does not fit in the window "
                f"[rank_start, rank_end) = [{self.rank_start}, {self.rank_end}); raise rank_end "
                f"to at least {self.rank_start + self.num_negatives}"
            )
        if (self.min_score is not None and self.max_score is not None
                and self.min_score > self.max_score):
            raise ValueError(
                f"min_score ({self.min_score}) is above max_score ({self.max_score}): no "
                "candidate could pass"
            )
        return self


class KnnMiner:
    def __init__(self, config: KnnConfig) -> None:
        self.config = config
        self.num_negatives = config.num_negatives
        self.search_depth = config.rank_end

    def _filtered(self, s: float, pos: float | None) -> str | None:
        """The name of the first filter that drops a candidate scoring `s`, else None (the
        order of sentence-transformers, so the counts agree)."""
        c = self.config
        if pos is not None:
            if c.margin is not None and s > pos - c.margin:
                return "margin"
            if c.relative_margin is not None and s > pos - abs(pos) * c.relative_margin:
                return "relative_margin"
        if c.max_score is not None and s > c.max_score:
            return "max_score"
        return None

    def choose(self, ranked: Ranked, *, pool_size: int, rng: random.Random) -> Choice | None:
        c = self.config
        survivors: list[tuple[int, float]] = []
        skipped: Counter[str] = Counter()
        ended = ranked.complete
        for idx, s in zip(ranked.indices, ranked.scores, strict=True):
            if c.min_score is not None and s < c.min_score:
                ended = True  # scores only fall from here
                break
            reason = self._filtered(s, ranked.pos_score)
            if reason is not None:
                skipped[reason] += 1
                continue
            survivors.append((idx, s))
            if len(survivors) == c.rank_end:
                ended = True
                break
        if not ended:
            return None  # the window is not full yet and the pool has more: search deeper
        window = survivors[c.rank_start : c.rank_end]
        if c.sample:
            picked = rng.sample(window, min(c.num_negatives, len(window)))
            picked.sort(key=lambda p: -p[1])
        else:
            picked = window[: c.num_negatives]
        return Choice(indices=[i for i, _ in picked], scores=[s for _, s in picked],
                      skipped=dict(skipped))

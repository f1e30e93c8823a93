"""Notice, while `mmemb prepare` writes, that the samples come grouped by their positive.

Training reads shards through a local shuffle buffer (`data.shuffle_buffer`, a few hundred
samples), which cannot undo an order wider than itself. A classification-style input sorted by
its target (a label column, a class-per-folder walk) then gives batches of two or three targets
and a loss that jumps whenever the stream reaches the next block: the from-scratch digits study
learned nothing that way (docs/results.md). Compared with what a random order would give, the
share of consecutive samples with the same positive says whether the input is grouped.
"""

from __future__ import annotations

from collections import Counter

from mmemb.data.schema import Sample

MAX_DISTINCT = 100_000
"""Past this many distinct positives the set is retrieval-like (nearly every positive unique):
grouping by target cannot hurt it, and counting stops to bound memory."""

MIN_SAMPLES = 100


class TargetOrder:
    """Counts consecutive samples that share their positive; `note` says when that is far more
    than a random order of the same samples would give."""

    def __init__(self) -> None:
        self.samples = 0
        self.same_as_previous = 0
        self.counts: Counter[bytes] | None = Counter()
        self._previous: bytes | None = None

    def add(self, sample: Sample) -> None:
        if self.counts is None:
            return
        key = sample.pos.digest()
        self.samples += 1
        self.same_as_previous += key == self._previous
        self._previous = key
        self.counts[key] += 1
        if len(self.counts) > MAX_DISTINCT:
            self.counts = None

    def expected_share(self) -> float:
        """The share of consecutive pairs with equal positives in a random order of these
        samples: sum over positives of n_k (n_k - 1) / (N (N - 1))."""
        assert self.counts is not None and self.samples > 1
        n = self.samples
        return sum(c * (c - 1) for c in self.counts.values()) / (n * (n - 1))

    def note(self) -> str | None:
        """One line for the prepare report, or None when the order looks random enough."""
        if self.counts is None or self.samples < MIN_SAMPLES:
            return None
        observed = self.same_as_previous / (self.samples - 1)
        expected = self.expected_share()
        # halfway from a random order to a fully grouped one
        if observed <= expected + 0.5 * (1.0 - expected):
            return None
        return (
            f"the samples come grouped by their positive: {100 * observed:.0f} % of consecutive "
            f"samples share it ({100 * expected:.0f} % in a random order). Training shuffles only "
            "within data.shuffle_buffer samples, so its batches would hold few targets; shuffle "
            "the input rows before preparing (image_folder does it itself)"
        )

"""Where each query's positive sits among the candidates, and which columns copy it.

The collator lays out a step's candidates as ``[pos_0 … pos_{B-1}, negs of query 0 (K), …]`` so
``targets = arange(B)``. Every candidate also carries a **content key** (an int64 hash of its
instruction, text and image bytes; see ``mmemb.data.collate.content_key``): a column whose key
equals row i's positive key, other than the positive itself, shows the same content as the
positive (on classification data, the same class name) and is masked out of row i — it is not a
negative, and scoring it as one is a false negative that a hardness reweighter amplifies most.
"""

from __future__ import annotations

import torch

from mmemb.errors import ConfigError

__all__ = [
    "DuplicateKeys",
    "assemble_candidates",
    "candidate_targets",
    "count_duplicates",
    "duplicate_mask",
    "positive_mask",
]


def candidate_targets(
    batch_size: int, num_negatives: int = 0, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Targets for the collator's candidate layout: query i's positive is column i.

    The layout is ``[pos_0 … pos_{B-1}, negs of query 0 (K), negs of query 1 (K), …]``, so the
    targets are ``arange(B)`` whatever ``num_negatives`` is; query i's own hard negatives are
    columns ``B + i·K … B + i·K + K − 1`` (every other column is a negative for it as well).

    Example::

        >>> candidate_targets(3, num_negatives=2)
        tensor([0, 1, 2])
    """
    if batch_size < 1:
        raise ConfigError([f"candidate_targets: batch_size must be at least 1 (got {batch_size})."])
    if num_negatives < 0:
        raise ConfigError(
            [f"candidate_targets: num_negatives must be 0 or more (got {num_negatives})."]
        )
    return torch.arange(batch_size, device=device)


def assemble_candidates(
    positives: torch.Tensor, negatives: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out candidates and targets from a batch with K hard negatives per query.

    ``positives`` is (B, D); ``negatives`` is (B, K, D), (B·K, D) ordered query by query, or None.
    Returns ``c`` = ``[positives; negatives of query 0; …; negatives of query B−1]`` (B + B·K, D)
    and ``targets = arange(B)``. Gradients flow to both inputs.

    Example::

        >>> c, t = assemble_candidates(torch.randn(4, 8), torch.randn(4, 2, 8))
        >>> c.shape, t.tolist()
        (torch.Size([12, 8]), [0, 1, 2, 3])
    """
    if positives.dim() != 2:
        raise ConfigError(
            [f"assemble_candidates: positives must be (B, D) (got shape {tuple(positives.shape)})."]
        )
    b, d = positives.shape
    targets = candidate_targets(b, device=positives.device)
    if negatives is None or negatives.numel() == 0:
        return positives, targets
    if negatives.dim() == 3:
        if negatives.shape[0] != b or negatives.shape[2] != d:
            raise ConfigError(
                [
                    f"assemble_candidates: negatives of shape {tuple(negatives.shape)} do not "
                    f"match positives {tuple(positives.shape)}; expected (B={b}, K, D={d})."
                ]
            )
        negatives = negatives.reshape(-1, d)
    elif negatives.dim() != 2 or negatives.shape[1] != d or negatives.shape[0] % b != 0:
        raise ConfigError(
            [
                f"assemble_candidates: negatives of shape {tuple(negatives.shape)} must be "
                f"(B, K, D) or (B·K, D) with B={b}, D={d}, ordered query by query."
            ]
        )
    return torch.cat([positives, negatives.to(positives.dtype)], dim=0), targets


def positive_mask(targets: torch.Tensor, col_start: int, col_end: int) -> torch.Tensor:
    """``is_pos`` for columns ``col_start … col_end − 1``: (len(targets), n) bool."""
    cols = torch.arange(col_start, col_end, device=targets.device)
    return targets[:, None] == cols[None, :]


class DuplicateKeys:
    """Content keys of one loss direction: ``rows`` (B,) each row's positive key, ``cols`` (M,)
    each column's key. Column j is masked from row i when ``cols[j] == rows[i]`` and j is not
    row i's target."""

    __slots__ = ("cols", "rows")

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows = rows
        self.cols = cols

    @classmethod
    def for_candidates(cls, keys: torch.Tensor, targets: torch.Tensor) -> DuplicateKeys:
        """Queries against candidates: row i's key is its positive's, ``keys[targets[i]]``."""
        return cls(keys[targets], keys)

    def reverse(self) -> DuplicateKeys:
        """Candidates→queries (the symmetric term): row i is positive ``t_i``, column j is query j,
        whose content key is its positive's (``rows``), so the same keys serve both sides."""
        return DuplicateKeys(self.rows, self.rows)

    def rows_slice(self, r0: int, r1: int) -> DuplicateKeys:
        return DuplicateKeys(self.rows[r0:r1], self.cols)


def duplicate_mask(
    keys: DuplicateKeys | None,
    targets: torch.Tensor,
    col_start: int,
    col_end: int,
    *,
    is_pos: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """(len(targets), n) bool: the columns ``col_start … col_end − 1`` that copy each row's
    positive (the positive itself excluded); None when ``keys`` is None. ``keys.rows`` must hold
    the same rows as ``targets``."""
    if keys is None:
        return None
    dup = keys.rows[:, None] == keys.cols[None, col_start:col_end]
    if is_pos is None:
        is_pos = positive_mask(targets, col_start, col_end)
    return dup & ~is_pos


def count_duplicates(keys: DuplicateKeys) -> int:
    """How many (row, column) entries :func:`duplicate_mask` masks over the whole matrix, in
    O((B + M) log(B + M)) time and no B×M buffer: Σ over keys of rows × columns sharing it,
    minus each row's own positive."""
    uniq, inverse = torch.unique(torch.cat([keys.rows, keys.cols]), return_inverse=True)
    b = keys.rows.shape[0]
    per_row = torch.bincount(inverse[:b], minlength=uniq.numel())
    per_col = torch.bincount(inverse[b:], minlength=uniq.numel())
    return int((per_row * per_col).sum()) - b

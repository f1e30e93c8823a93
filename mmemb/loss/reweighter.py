"""The reweighter API: how each candidate contributes to the contrastive loss.

A :class:`Reweighter` changes the loss through two elementwise transforms that only need a row's
own statistics, so the same definition works on the full B×M matrix and inside a tile of it:
``transform_logits`` changes the forward (and the loss value), ``transform_probs`` only the
backward. :class:`FusedForm` is the closed family a fused kernel can implement without calling
Python. See docs/loss.md for the maths of each built-in reweighter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

__all__ = ["PLAIN", "FusedForm", "PlainInfoNCE", "Reweighter", "RowStats"]

RowStats = dict[str, torch.Tensor]
"""Per-row statistics of a reweighter: every value has the rows as its first dimension."""


@dataclass(frozen=True)
class FusedForm:
    """A reweighter described in the closed family the fused (Triton) kernel implements.

    The Triton kernel cannot call Python, so it implements four elementwise forms itself. A
    reweighter whose maths is one of them returns it from :meth:`Reweighter.fused_form`; any other
    reweighter runs on the PyTorch tiles (on every device), which call its transforms directly.

    - ``none``: plain InfoNCE.
    - ``ega``: ``p̄_ij = p_ij·(1 + alpha·h_ij)`` for negatives with the hardness ``h`` given by
      ``hardness`` (``exp``: ``min(1, exp((s_ij − s_i+)/tau_h))``, ``tau_h=None`` meaning the loss
      temperature; ``linear``: ``clamp((s_ij − s_i+ + margin)/margin, 0, 1)``), ``h = 0`` where
      ``s_ij − s_i+ > fn_margin``, and ``normalize`` rescaling a row's negatives to their original
      mass.
    - ``llave``: ``z'_ij = z_ij + alpha·sg(s_ij)`` for negatives.
    - ``topk_mask``: negatives with ``s_ij > s_i+ + delta + tie_tol`` are removed, then only
      negatives whose similarity is at least the row's ``k``-th largest remaining one minus
      ``tie_tol`` are kept.
    """

    kind: Literal["none", "ega", "llave", "topk_mask"]
    alpha: float = 0.0
    tau_h: float | None = None
    hardness: Literal["exp", "linear"] = "exp"
    margin: float = 0.1
    normalize: bool = False
    fn_margin: float | None = None
    k: int = 0
    delta: float = 0.0
    tie_tol: float = 0.0


class Reweighter:
    """How each candidate contributes to the contrastive loss. The base class is plain InfoNCE.

    A reweighter is built from its config before the loss temperature is known
    (``mmemb.plugins.build("reweighter", "ega", alpha=2.0)``), so it holds only its own options.
    Everything that depends on the step arrives as arguments: the temperature ``τ`` (a float) and
    the row statistics. It must be stateless between calls (one instance serves every step, both
    directions of a symmetric loss and every tile).

    **Tiles.** Every method sees one tile of the logits matrix: ``z`` (r, n) are the logits
    ``z_ij = q_i·c_j/τ`` of r rows (queries) and n columns (candidates), in float32 (float64 when
    the inputs are float64); ``z_pos`` (r, 1) is each row's positive logit ``z_i+``; ``is_pos``
    (r, n, bool) marks the positive's column. The similarity is ``s = z·τ``. A transform must be
    elementwise given these per-row values (and the row statistics), so the result never depends
    on how the matrix is tiled. The full-matrix path calls the same methods with one tile that is
    the whole matrix.

    **The two transforms** (override one or both and set the matching class flag):

    - ``transform_logits(z, z_pos, is_pos, *, temperature, stats) -> z'`` (``transforms_logits``):
      the softmax and the loss value use ``z'``. mmemb differentiates it as the identity: the
      result must be ``z`` plus a term treated as a constant (stop-gradient), or ``-inf`` to
      remove a candidate from the row. It is also applied to the positive (``is_pos`` all true).
    - ``transform_probs(p, z, z_pos, is_pos, *, temperature, stats) -> p̄`` (``transforms_probs``):
      called in the backward only, with ``p = softmax(z')`` of the row and the raw logits ``z``;
      the gradient of the logits becomes ``(p̄ − y)/B``. The loss value is unchanged.

    **Row statistics** (``has_row_stats``): values a transform needs beyond ``z_pos`` and the
    row's log-sum-exp, accumulated while streaming over the row's tiles of raw logits:
    ``init_row_stats`` → ``update_row_stats`` per tile → ``finalize_row_stats``; the finalised
    dict is passed to the transforms. If ``transform_logits`` reads them (``logits_use_stats``) the
    tiled forward makes one extra pass over the row to finish them before the log-sum-exp.
    Statistics are computed without gradient.

    Example::

        class Halve(Reweighter):
            '''Halve every negative's share of the gradient.'''
            transforms_probs = True

            def transform_probs(self, p, z, z_pos, is_pos, *, temperature, stats):
                return torch.where(is_pos, p, 0.5 * p)
    """

    name: ClassVar[str] = "base"
    # Flags may be set per instance (e.g. a statistic only some options need).
    transforms_logits: bool = False
    transforms_probs: bool = False
    has_row_stats: bool = False
    logits_use_stats: bool = False

    def init_row_stats(self, rows: int, *, device: torch.device, dtype: torch.dtype) -> RowStats:
        """Empty statistics for ``rows`` rows."""
        return {}

    def update_row_stats(
        self,
        stats: RowStats,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
    ) -> RowStats:
        """Fold one tile of raw logits into the statistics; returns the new statistics."""
        return stats

    def finalize_row_stats(self, stats: RowStats, *, temperature: float) -> RowStats:
        """Statistics as the transforms read them, after every tile of the row was seen."""
        return stats

    def transform_logits(
        self,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
        stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The logits the softmax sees (identity here)."""
        return z

    def transform_probs(
        self,
        p: torch.Tensor,
        z: torch.Tensor,
        z_pos: torch.Tensor,
        is_pos: torch.Tensor,
        *,
        temperature: float,
        stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The probabilities the backward uses in place of ``p`` (identity here)."""
        return p

    def fused_form(self) -> FusedForm | None:
        """This reweighter in the fused kernel's family, or None to run on the PyTorch tiles."""
        return None

    def __repr__(self) -> str:
        cfg = getattr(self, "config", None)
        args = ""
        if cfg is not None and hasattr(cfg, "model_dump"):
            args = ", ".join(f"{k}={v!r}" for k, v in cfg.model_dump().items())
        return f"{type(self).__name__}({args})"


class PlainInfoNCE(Reweighter):
    """Plain InfoNCE: no reweighting. Used when ``reweighter=None``; registered as ``none``.

    ``L = mean_i [logsumexp_j z_ij − z_i+]`` with the logits gradient ``(p − y)/B``
    (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding").
    """

    name: ClassVar[str] = "none"

    def fused_form(self) -> FusedForm:
        return FusedForm(kind="none")


PLAIN = PlainInfoNCE()
"""The shared plain-InfoNCE reweighter (stateless)."""

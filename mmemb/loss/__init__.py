"""The contrastive loss: reweighters, candidate layout, implementations, diagnostics.

The loss of one step, for queries ``q`` (B, D) and candidates ``c`` (M, D) (every positive and
every explicit hard negative), with ``targets[i]`` the column of query i's positive::

    s = q cᵀ                  similarities (embeddings are used as given; the model normalises them)
    z = s / τ                 logits
    L = mean_i CE(z_i, targets_i) = mean_i [logsumexp_j z_ij − z_i,targets_i]

Modules, one job each:

- :mod:`~mmemb.loss.reweighter` — the :class:`Reweighter` API (elementwise transforms of the
  logits and/or the probabilities, with per-row statistics) and :class:`FusedForm`;
- :mod:`~mmemb.loss.layout` — targets, the candidate layout, duplicate-positive masks;
- :mod:`~mmemb.loss.full` — the reference full-matrix implementation (loss ``full``);
- :mod:`~mmemb.loss.objective` — :class:`ContrastiveLoss`, the step's loss built once from the
  recipe (:func:`build_loss`), and the functional :func:`contrastive_loss`;
- :mod:`~mmemb.loss.diagnostics` — metrics of what the reweighter did to the gradient.

This package imports no plugin: other implementations (``tiled``) are registered ``loss``
components that a recipe names.
"""

from mmemb.loss.checks import check_temperature
from mmemb.loss.diagnostics import loss_diagnostics
from mmemb.loss.full import FullMatrixLoss, full_matrix_loss
from mmemb.loss.layout import (
    DuplicateKeys,
    assemble_candidates,
    candidate_targets,
    count_duplicates,
    duplicate_mask,
    positive_mask,
)
from mmemb.loss.objective import (
    ContrastiveLoss,
    DirectionalLoss,
    build_loss,
    contrastive_loss,
    gathered_contrastive_loss,
)
from mmemb.loss.reweighter import PLAIN, FusedForm, PlainInfoNCE, Reweighter, RowStats

__all__ = [
    "PLAIN",
    "ContrastiveLoss",
    "DirectionalLoss",
    "DuplicateKeys",
    "FullMatrixLoss",
    "FusedForm",
    "PlainInfoNCE",
    "Reweighter",
    "RowStats",
    "assemble_candidates",
    "build_loss",
    "candidate_targets",
    "check_temperature",
    "contrastive_loss",
    "count_duplicates",
    "duplicate_mask",
    "full_matrix_loss",
    "gathered_contrastive_loss",
    "loss_diagnostics",
    "positive_mask",
]

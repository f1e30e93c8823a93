"""The step's contrastive loss as one object: built once from the recipe's ``loss`` section.

:class:`ContrastiveLoss` owns everything a step's loss needs — the implementation of one
direction (the registered ``loss`` component the recipe names: ``full``, ``tiled``, or a
third-party one), the temperature, the reweighter, the symmetric term and duplicate-positive
masking — and gathers candidates across ranks when a process group is up. The trainer builds it
with :func:`build_loss` and passes the same object to the step and to the diagnostics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist

from mmemb import plugins
from mmemb.distributed import all_gather_rows, all_gather_with_grad
from mmemb.errors import ConfigError
from mmemb.loss.checks import check_inputs, check_temperature
from mmemb.loss.diagnostics import loss_diagnostics
from mmemb.loss.full import FullMatrixLoss
from mmemb.loss.layout import DuplicateKeys, count_duplicates
from mmemb.loss.reweighter import PLAIN, Reweighter

__all__ = [
    "ContrastiveLoss",
    "DirectionalLoss",
    "build_loss",
    "contrastive_loss",
    "gathered_contrastive_loss",
]


class DirectionalLoss(Protocol):
    """What a registered ``loss`` component computes: one direction of the loss.

    ``impl(q, c, targets, *, temperature, reweighter, keys)`` returns the scalar
    ``mean_i CE(z'_i, targets_i)`` (float32; float64 for float64 inputs) whose backward gives the
    reweighted gradients w.r.t. ``q``, ``c`` and a tensor ``temperature``. ``keys`` (or None)
    names, per row, the columns that copy its positive: they must get no probability and no
    gradient (``mmemb.loss.duplicate_mask`` computes them for any block of the matrix). Options
    such as a tile size belong to the component's own config.
    """

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter,
        keys: DuplicateKeys | None = None,
    ) -> torch.Tensor: ...


_FULL = FullMatrixLoss()


class ContrastiveLoss:
    """InfoNCE over a step's queries and candidates, with a reweighter, an optional symmetric term,
    duplicate-positive masking and cross-rank gathering.

    Expects query embeddings ``q`` (B, D), candidate embeddings ``c`` (M, D) — every positive and
    every explicit hard negative, e.g. from :func:`mmemb.loss.assemble_candidates` — ``targets``
    (B,), the column of each query's positive, and optionally ``keys`` (M,), each candidate's
    int64 content key (the collator makes them). Embeddings are used as given (the model
    normalises them). Returns the scalar mean loss::

        z = q cᵀ / τ,   L = mean_i [logsumexp_j z'_ij − z'_i,t_i],   z' = transform_logits(z)

    whose gradient w.r.t. the logits is ``(p̄ − y)/B`` (``p̄`` the reweighter's
    ``transform_probs(p)``). With ``symmetric`` the candidates→queries term is added for the
    pairs and the two directions are averaged. With ``mask_duplicate_positives`` and ``keys``,
    a column whose content equals row i's positive (another query's copy of it) is removed from
    row i: on label-like data it is not a negative.

    Under an initialised process group with several ranks, each rank passes its own batch; the
    candidates (and keys, and for the symmetric term the queries) of every rank are gathered with
    the gradient kept, and the returned loss is scaled so that averaging parameter gradients over
    ranks (what DDP and DeepSpeed do) gives exactly the gradients of the single-device loss on
    the concatenated batch. Every rank must call it.

    After each call, ``last_masked`` holds how many (row, column) entries were masked (this rank's
    rows; both directions when symmetric).

    Args:
        impl: one direction of the loss (a registered ``loss`` component); the full matrix when
            None.
        temperature: τ > 0, a float or a 1-element tensor (a learnable temperature gets a
            gradient).
        reweighter: a :class:`~mmemb.loss.Reweighter`; None is plain InfoNCE.
        symmetric: add the candidates→queries direction (needs one distinct positive per query).
        mask_duplicate_positives: mask copies of a row's positive (when ``keys`` are given).

    References:
        van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding";
        Xue, Li & Liu 2025, "Improve Multi-Modal Embedding Learning via Explicit Hard Negative
        Gradient Amplifying" (arXiv:2506.02020).

    Example::

        >>> ega = mmemb.plugins.build("reweighter", "ega")               # doctest: +SKIP
        >>> loss_fn = ContrastiveLoss(temperature=0.02, reweighter=ega)  # doctest: +SKIP
        >>> loss = loss_fn(q, c, targets, keys=batch.keys)               # doctest: +SKIP
        >>> loss.backward()                                              # doctest: +SKIP
    """

    def __init__(
        self,
        impl: DirectionalLoss | None = None,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter | None = None,
        symmetric: bool = False,
        mask_duplicate_positives: bool = True,
    ) -> None:
        if reweighter is not None and not isinstance(reweighter, Reweighter):
            raise ConfigError(
                [
                    f"ContrastiveLoss: reweighter must be a mmemb.loss.Reweighter (got "
                    f"{type(reweighter).__name__}); build one with "
                    "mmemb.plugins.build('reweighter', name, ...)."
                ]
            )
        # A float is checked once here; a learnable (tensor) temperature changes, so per call.
        self.tau = check_temperature(temperature, "loss.temperature")
        self.temperature = temperature
        self.impl: DirectionalLoss = impl if impl is not None else _FULL
        self.reweighter = reweighter or PLAIN
        self.symmetric = symmetric
        self.mask_duplicate_positives = mask_duplicate_positives
        self.last_masked = 0

    def __repr__(self) -> str:
        return (
            f"ContrastiveLoss({self.impl!r}, temperature={self.tau}, "
            f"reweighter={self.reweighter!r}, symmetric={self.symmetric}, "
            f"mask_duplicate_positives={self.mask_duplicate_positives})"
        )

    def _temperature(self, where: str) -> float | torch.Tensor:
        if isinstance(self.temperature, torch.Tensor):
            self.tau = check_temperature(self.temperature, where)
        return self.temperature

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        keys: torch.Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        where = "ContrastiveLoss"
        check_inputs(
            q,
            c,
            targets,
            symmetric=self.symmetric,
            reweighter=self.reweighter,
            where=where,
            keys=keys,
        )
        tau = self._temperature(where)
        targets = targets.long()
        if not self.mask_duplicate_positives:
            keys = None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self._local(q, c, targets, keys, tau)
        return self._gathered(q, c, targets, keys, tau, group)

    def _direction(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        keys: DuplicateKeys | None,
        tau: float | torch.Tensor,
    ) -> torch.Tensor:
        if keys is not None:
            self.last_masked += count_duplicates(keys)
        return self.impl(q, c, targets, temperature=tau, reweighter=self.reweighter, keys=keys)

    def _local(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        keys: torch.Tensor | None,
        tau: float | torch.Tensor,
    ) -> torch.Tensor:
        self.last_masked = 0
        dkeys = None if keys is None else DuplicateKeys.for_candidates(keys, targets)
        loss = self._direction(q, c, targets, dkeys, tau)
        if not self.symmetric:
            return loss
        rev_targets = torch.arange(q.shape[0], device=q.device)
        rev = self._direction(
            c[targets], q, rev_targets, None if dkeys is None else dkeys.reverse(), tau
        )
        return 0.5 * (loss + rev)

    def _gathered(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        keys: torch.Tensor | None,
        tau: float | torch.Tensor,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        self.last_masked = 0
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        c_all, c_sizes = all_gather_with_grad(c, group)
        b = q.shape[0]
        t_global = targets + sum(c_sizes[:rank])
        row_keys = None if keys is None else keys[targets]
        dkeys = None
        if keys is not None:
            assert row_keys is not None
            dkeys = DuplicateKeys(row_keys, all_gather_rows(keys, group))
        loss = self._direction(q, c_all, t_global, dkeys, tau)
        if self.symmetric:
            q_all, q_sizes = all_gather_with_grad(q, group)
            rev_t = torch.arange(b, device=q.device) + sum(q_sizes[:rank])
            rev_keys = None
            if row_keys is not None:
                rev_keys = DuplicateKeys(row_keys, all_gather_rows(row_keys, group))
            rev = self._direction(c[targets], q_all, rev_t, rev_keys, tau)
            loss = 0.5 * (loss + rev)
            total = sum(q_sizes)
        else:
            sizes = torch.tensor([b], device=q.device, dtype=torch.int64)
            dist.all_reduce(sizes, group=group)
            total = int(sizes.item())
        return loss * (world * b / total)

    def diagnostics(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        keys: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """:func:`~mmemb.loss.loss_diagnostics` of this loss on this rank's detached batch
        (queries→candidates direction, the loss's own masking)."""
        return loss_diagnostics(
            q,
            c,
            targets,
            temperature=self._temperature("ContrastiveLoss.diagnostics"),
            reweighter=self.reweighter,
            keys=keys if self.mask_duplicate_positives else None,
        )


def build_loss(spec: Mapping[str, Any], *, where: str = "loss") -> ContrastiveLoss:
    """The :class:`ContrastiveLoss` a recipe's ``loss`` section describes.

    ``spec`` is ``{name, temperature, reweighter, symmetric, mask_duplicate_positives,
    <options of the named loss component>}`` (e.g. ``tile_size`` and ``implementation`` for
    ``tiled``); the reweighter is a name or ``{name, <its options>}``.
    """
    own = {"name", "temperature", "reweighter", "symmetric", "mask_duplicate_positives"}
    name = spec.get("name", "full")
    options = {k: v for k, v in spec.items() if k not in own}
    impl = plugins.build("loss", name, _where=where, **options)
    reweighter = plugins.build_from(
        "reweighter", spec.get("reweighter") or "none", where=f"{where}.reweighter"
    )
    return ContrastiveLoss(
        impl,
        temperature=spec.get("temperature", 0.02),
        reweighter=reweighter,
        symmetric=bool(spec.get("symmetric", False)),
        mask_duplicate_positives=bool(spec.get("mask_duplicate_positives", True)),
    )


def contrastive_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    symmetric: bool = False,
    keys: torch.Tensor | None = None,
    impl: DirectionalLoss | None = None,
) -> torch.Tensor:
    """:class:`ContrastiveLoss` as a function, on this process's batch only (no gathering).

    ``impl`` picks the implementation of one direction (default: the full matrix), e.g.
    ``mmemb.plugins.build("loss", "tiled", tile_size=1024)``; ``keys`` (M,) masks copies of each
    row's positive. See :class:`ContrastiveLoss` for the maths.

    Example::

        >>> q = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
        >>> c, t = assemble_candidates(torch.nn.functional.normalize(torch.randn(4, 16), dim=-1))
        >>> loss = contrastive_loss(q, c, t, temperature=0.02)
    """
    fn = ContrastiveLoss(
        impl,
        temperature=temperature,
        reweighter=reweighter,
        symmetric=symmetric,
        mask_duplicate_positives=keys is not None,
    )
    where = "contrastive_loss"
    check_inputs(q, c, targets, symmetric=symmetric, reweighter=reweighter, where=where, keys=keys)
    return fn._local(q, c, targets.long(), keys, fn._temperature(where))


def gathered_contrastive_loss(
    q_local: torch.Tensor,
    c_local: torch.Tensor,
    targets_local: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    symmetric: bool = False,
    keys: torch.Tensor | None = None,
    impl: DirectionalLoss | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """:func:`contrastive_loss` over the batch of every rank (see :class:`ContrastiveLoss`): each
    rank passes its own queries, candidates, local targets and keys; backpropagating the result on
    every rank and averaging parameter gradients gives the single-device gradients."""
    fn = ContrastiveLoss(
        impl,
        temperature=temperature,
        reweighter=reweighter,
        symmetric=symmetric,
        mask_duplicate_positives=keys is not None,
    )
    return fn(q_local, c_local, targets_local, keys=keys, group=group)

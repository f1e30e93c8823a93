"""Contrastive loss orchestration: candidate layout, reweighters, tiling and cross-rank gathering.

The loss of one step, for queries ``q`` (B, D) and candidates ``c`` (M, D) (every positive and every
explicit hard negative), with ``targets[i]`` the column of query i's positive::

    s = q cᵀ                  similarities (embeddings are used as given; the model normalises them)
    z = s / τ                 logits
    L = mean_i CE(z_i, targets_i) = mean_i [logsumexp_j z_ij − z_i,targets_i]

A :class:`Reweighter` changes how each candidate contributes, through two elementwise transforms
that only need a row's own statistics, so that the same definition works on the full B×M matrix and
inside a tile of it (see docs/loss.md for the maths of each one):

- ``transform_logits`` changes the forward (and so the loss value), e.g. LLaVE's ``z + α·sg(s)``;
- ``transform_probs`` changes only the backward: the gradient of the logits becomes ``(p̄ − y)/B``
  instead of ``(p − y)/B`` and the loss value is untouched (the Explicit Gradient Amplifier).

``contrastive_loss(..., tile_size=None)`` computes the full matrix; an integer ``tile_size`` uses
the registered ``tiled`` loss (plugin ``mmemb_tiled``: PyTorch tiles, or a Triton kernel on CUDA),
which never holds more than a tile of logits. ``gathered_contrastive_loss`` adds the candidates and
queries of every rank. This module imports no plugin: the tiled implementation is reached through
``mmemb.plugins``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.distributed as dist

from mmemb import plugins
from mmemb.errors import ConfigError

__all__ = [
    "ContrastiveLossImpl",
    "FusedForm",
    "PlainInfoNCE",
    "Reweighter",
    "RowStats",
    "all_gather_with_grad",
    "assemble_candidates",
    "candidate_targets",
    "contrastive_loss",
    "full_matrix_loss",
    "gathered_contrastive_loss",
    "loss_diagnostics",
    "positive_mask",
]

RowStats = dict[str, torch.Tensor]
"""Per-row statistics of a reweighter: every value has the rows as its first dimension."""


# --------------------------------------------------------------------------------------------------
# Reweighters
# --------------------------------------------------------------------------------------------------


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


_PLAIN = PlainInfoNCE()


class ContrastiveLossImpl(Protocol):
    """What a registered ``loss`` component (e.g. ``tiled``) computes: one direction of the loss.

    ``impl(q, c, targets, *, temperature, reweighter, tile_size)`` returns the scalar
    ``mean_i CE(z'_i, targets_i)`` (float32, float64 for float64 inputs) whose backward gives the
    reweighted gradients w.r.t. ``q``, ``c`` and a tensor ``temperature``.
    """

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter,
        tile_size: int,
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# Candidate layout
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float | torch.Tensor, where: str) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ConfigError(
                [f"{where}: temperature must be a number or a 1-element tensor "
                 f"(got shape {tuple(temperature.shape)})."]
            )
        value = float(temperature.detach())
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ConfigError(
            [f"{where}: temperature must be a positive number (got {temperature!r})."]
        )
    else:
        value = float(temperature)
    if not (value > 0.0 and math.isfinite(value)):
        raise ConfigError(
            [f"{where}: temperature must be a positive finite number (got {value!r}); "
             "the usual value is 0.02."]
        )
    return value


def _check_inputs(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    tile_size: int | None,
    symmetric: bool,
    reweighter: Reweighter | None,
    where: str,
) -> None:
    problems: list[str] = []
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        problems.append(f"{where}: q must be a (B, D) tensor (got {_shape(q)}).")
    if not isinstance(c, torch.Tensor) or c.dim() != 2:
        problems.append(f"{where}: c must be an (M, D) tensor (got {_shape(c)}).")
    if problems:
        raise ConfigError(problems)
    if q.shape[0] < 1 or c.shape[0] < 1:
        problems.append(
            f"{where}: empty batch (q {tuple(q.shape)}, c {tuple(c.shape)}); "
            "every step needs at least one query and one candidate."
        )
    if q.shape[1] != c.shape[1]:
        problems.append(
            f"{where}: query and candidate embeddings differ in width (q {tuple(q.shape)}, "
            f"c {tuple(c.shape)}); both sides must come from encoders with the same output size."
        )
    if q.dtype != c.dtype or not q.dtype.is_floating_point:
        problems.append(
            f"{where}: q and c must share one floating dtype (got {q.dtype} and {c.dtype}); "
            "cast both to the same dtype."
        )
    if q.device != c.device:
        problems.append(
            f"{where}: q is on {q.device} but c on {c.device}; move both to one device."
        )
    if not isinstance(targets, torch.Tensor) or targets.shape != (q.shape[0],):
        problems.append(
            f"{where}: targets must be a (B,) tensor with B={q.shape[0]} (got {_shape(targets)})."
        )
    elif targets.dtype not in (torch.int64, torch.int32):
        problems.append(f"{where}: targets must be integer column indices (got {targets.dtype}).")
    if tile_size is not None and (
        isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1
    ):
        problems.append(
            f"{where}: tile_size must be a positive integer or None (got {tile_size!r}); "
            "None computes the full matrix; 1024–2048 are good tiles on CPU."
        )
    if reweighter is not None and not isinstance(reweighter, Reweighter):
        problems.append(
            f"{where}: reweighter must be a mmemb.loss.Reweighter "
            f"(got {type(reweighter).__name__}); build one with "
            "mmemb.plugins.build('reweighter', name, ...)."
        )
    if problems:
        raise ConfigError(problems)
    lo, hi = (int(v) for v in torch.aminmax(targets.detach()))
    if lo < 0 or hi >= c.shape[0]:
        raise ConfigError(
            [f"{where}: targets must be column indices in [0, {c.shape[0]}) (got values in "
             f"[{lo}, {hi}]); build them with candidate_targets/assemble_candidates."]
        )
    if symmetric and torch.unique(targets).numel() != targets.numel():
        raise ConfigError(
            [f"{where}: symmetric=True needs one distinct positive per query, but some queries "
             "share a positive column; use symmetric=False for this batch."]
        )


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------------
# Full matrix
# --------------------------------------------------------------------------------------------------


class _FullMatrixCE(torch.autograd.Function):
    """mean_i CE(transform_logits(z)_i, t_i) with the logits gradient (p̄ − y)/B."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, targets: torch.Tensor, tau: float, rw: Reweighter
    ) -> torch.Tensor:
        b = z.shape[0]
        rows = torch.arange(b, device=z.device)
        z_pos = z[rows, targets].unsqueeze(1)
        is_pos = _is_pos_or_empty(rw, targets, z)
        stats = _full_row_stats(rw, z, z_pos, is_pos, tau)
        zt = (
            rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
            if rw.transforms_logits
            else z
        )
        lse = torch.logsumexp(zt, dim=1)
        loss = (lse - zt[rows, targets]).mean()
        ctx.tau, ctx.rw, ctx.stat_keys = tau, rw, list(stats)
        ctx.save_for_backward(z, targets, lse, *stats.values())
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, targets, lse, *stat_values = ctx.saved_tensors
        rw: Reweighter = ctx.rw
        tau: float = ctx.tau
        stats = dict(zip(ctx.stat_keys, stat_values, strict=True))
        b = z.shape[0]
        rows = torch.arange(b, device=z.device)
        z_pos = z[rows, targets].unsqueeze(1)
        is_pos = _is_pos_or_empty(rw, targets, z)
        zt = (
            rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
            if rw.transforms_logits
            else z
        )
        p = torch.exp(zt - lse[:, None])
        del zt
        if rw.transforms_probs:
            p = rw.transform_probs(p, z, z_pos, is_pos, temperature=tau, stats=stats)
        p[rows, targets] -= 1.0
        p.mul_(grad_out / b)
        return p, None, None, None


def _is_pos_or_empty(rw: Reweighter, targets: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``is_pos`` for the full matrix, or an empty tensor when the reweighter reads none of it."""
    if rw.transforms_logits or rw.transforms_probs or rw.has_row_stats:
        return positive_mask(targets, 0, z.shape[1])
    return torch.empty(0, dtype=torch.bool, device=z.device)


def _full_row_stats(
    rw: Reweighter, z: torch.Tensor, z_pos: torch.Tensor, is_pos: torch.Tensor, tau: float
) -> RowStats:
    if not rw.has_row_stats:
        return {}
    stats = rw.init_row_stats(z.shape[0], device=z.device, dtype=z.dtype)
    stats = rw.update_row_stats(stats, z.detach(), z_pos.detach(), is_pos, temperature=tau)
    return rw.finalize_row_stats(stats, temperature=tau)


def full_matrix_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
) -> torch.Tensor:
    """One direction of the loss on the full B×M matrix (no validation; see contrastive_loss)."""
    rw = reweighter or _PLAIN
    acc = _acc_dtype(q.dtype)
    tau = _check_temperature(temperature, "full_matrix_loss")
    inv = 1.0 / temperature if isinstance(temperature, torch.Tensor) else 1.0 / tau
    z = (q.to(acc) * inv) @ c.to(acc).T
    return _FullMatrixCE.apply(z, targets, tau, rw)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

_impl_cache: dict[plugins.Component, ContrastiveLossImpl] = {}


def _tiled_impl() -> ContrastiveLossImpl:
    comp = plugins.get("loss", "tiled", where="contrastive_loss(tile_size=...)")
    impl = _impl_cache.get(comp)
    if impl is None:
        impl = plugins.build("loss", "tiled")
        _impl_cache[comp] = impl
    return impl


def _directional(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor,
    rw: Reweighter,
    tile_size: int | None,
) -> torch.Tensor:
    if tile_size is None:
        return full_matrix_loss(q, c, targets, temperature=temperature, reweighter=rw)
    return _tiled_impl()(q, c, targets, temperature=temperature, reweighter=rw, tile_size=tile_size)


def contrastive_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    tile_size: int | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE over a batch of queries and candidates, with an optional reweighter and tiling.

    Expects query embeddings ``q`` (B, D), candidate embeddings ``c`` (M, D) — every positive and
    every explicit hard negative, e.g. from :func:`assemble_candidates` — and ``targets`` (B,), the
    column of each query's positive. Embeddings are used as given (normalise them in the model).
    Returns the scalar mean loss (float32; float64 for float64 inputs)::

        z = q cᵀ / τ,   L = mean_i [logsumexp_j z'_ij − z'_i,t_i],   z' = transform_logits(z)

    whose gradient w.r.t. the logits is ``(p̄ − y)/B`` (``p = softmax(z')``, ``p̄`` the reweighter's
    ``transform_probs(p)``). With ``symmetric=True`` the candidates→queries term is added for the
    pairs: row ``c_{t_i}`` against every query, target ``i``, same reweighter, and the two
    directions are averaged (``(L_q→c + L_c→q)/2``; needs distinct targets).

    Args:
        temperature: τ > 0, a float or a 1-element tensor (a learnable temperature gets a gradient).
        reweighter: a :class:`Reweighter`, e.g. ``mmemb.plugins.build("reweighter", "ega")``;
            None is plain InfoNCE.
        tile_size: None computes the full B×M matrix; an integer uses the ``tiled`` loss, whose
            memory is O((B+M)·D + tile²) (PyTorch tiles of that size, or the Triton kernel on
            CUDA). Same values and gradients to floating-point tolerance.
        symmetric: add the candidates→queries direction.

    References:
        van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding";
        Xue, Li & Liu 2025, "Improve Multi-Modal Embedding Learning via Explicit Hard Negative
        Gradient Amplifying" (arXiv:2506.02020).

    Example::

        >>> q = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
        >>> c, t = assemble_candidates(torch.nn.functional.normalize(torch.randn(4, 16), dim=-1))
        >>> ega = mmemb.plugins.build("reweighter", "ega", alpha=1.0)        # doctest: +SKIP
        >>> loss = contrastive_loss(q, c, t, temperature=0.02, reweighter=ega)  # doctest: +SKIP
    """
    rw = reweighter or _PLAIN
    _check_inputs(
        q, c, targets, tile_size=tile_size, symmetric=symmetric, reweighter=reweighter,
        where="contrastive_loss",
    )
    _check_temperature(temperature, "contrastive_loss")
    targets = targets.long()
    loss = _directional(q, c, targets, temperature, rw, tile_size)
    if not symmetric:
        return loss
    rev_targets = torch.arange(q.shape[0], device=q.device)
    rev = _directional(c[targets], q, rev_targets, temperature, rw, tile_size)
    return 0.5 * (loss + rev)


# --------------------------------------------------------------------------------------------------
# Across ranks
# --------------------------------------------------------------------------------------------------


def all_gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` (n_r, …) of every rank along dim 0; the result keeps the gradient.

    Ranks may hold different numbers of rows (the rows are padded for the collective and the
    padding dropped). In the backward, each rank's shard receives the sum over ranks of the
    gradients of its rows (all_gather's backward is a reduce-scatter). Returns the concatenation
    and the list of row counts per rank.
    """
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n, group=group)
    sizes = [int(s.item()) for s in sizes_t]
    most = max(sizes)
    padded = x
    if x.shape[0] < most:
        pad = x.new_zeros((most - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    parts = _AllGather.apply(padded.contiguous(), group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0), sizes


class _AllGather(torch.autograd.Function):
    """all_gather with a backward: each rank's input gets the sum over ranks of the gradients of
    its part (an all-reduce of the stacked gradients, then this rank's slice: gloo has no
    reduce-scatter). torch's own `torch.distributed.nn.all_gather` is deprecated."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None
    ) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def gathered_contrastive_loss(
    q_local: torch.Tensor,
    c_local: torch.Tensor,
    targets_local: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    tile_size: int | None = None,
    symmetric: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """:func:`contrastive_loss` over the batch of every rank, for data-parallel training.

    Each rank passes its own queries (b_r, D), candidates (m_r, D) and local targets (indices into
    its own ``c_local``, e.g. from :func:`assemble_candidates`). The candidates (and, when
    symmetric, the queries) of all ranks are gathered with the gradient kept: this rank's rows are
    scored against every rank's candidates, and all_gather's backward returns to each rank the
    gradient its shard received from every rank's rows. The returned loss is this rank's rows'
    share, scaled by ``N·b_r/B``, so that backpropagating it on every rank and then **averaging**
    the parameter gradients across ranks (what DDP and DeepSpeed do) gives exactly the gradients of
    ``contrastive_loss`` on the concatenated batch (queries concatenated in rank order, candidates
    likewise, targets shifted). Its value is the mean loss of this rank's queries (equal batch
    sizes); the mean of the values over ranks is the loss of the whole batch. Ranks may have
    different batch sizes. Without an initialised process group, or with one rank, this is
    ``contrastive_loss``. Every rank must call it (it runs collectives forward and backward).

    Example::

        loss = gathered_contrastive_loss(q, c, t, temperature=0.02, reweighter=ega)
        loss.backward()          # then DDP / DeepSpeed averages the gradients
    """
    kwargs: dict[str, Any] = dict(
        temperature=temperature, reweighter=reweighter, tile_size=tile_size, symmetric=symmetric
    )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss(q_local, c_local, targets_local, **kwargs)
    where = "gathered_contrastive_loss"
    _check_inputs(
        q_local, c_local, targets_local, tile_size=tile_size, symmetric=symmetric,
        reweighter=reweighter, where=where,
    )
    _check_temperature(temperature, where)
    rw = reweighter or _PLAIN
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    targets_local = targets_local.long()
    c_all, c_sizes = all_gather_with_grad(c_local, group)
    b_local = q_local.shape[0]
    t_global = targets_local + sum(c_sizes[:rank])
    loss = _directional(q_local, c_all, t_global, temperature, rw, tile_size)
    if symmetric:
        q_all, q_sizes = all_gather_with_grad(q_local, group)
        rev_t = torch.arange(b_local, device=q_local.device) + sum(q_sizes[:rank])
        rev = _directional(c_local[targets_local], q_all, rev_t, temperature, rw, tile_size)
        loss = 0.5 * (loss + rev)
        total = sum(q_sizes)
    else:
        sizes_t = torch.tensor([b_local], device=q_local.device, dtype=torch.int64)
        dist.all_reduce(sizes_t, group=group)
        total = int(sizes_t.item())
    return loss * (world * b_local / total)


# --------------------------------------------------------------------------------------------------
# Diagnostics (off the hot path)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def loss_diagnostics(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    max_elements: int = 1 << 24,
) -> dict[str, float]:
    """Training metrics of one loss call, computed without gradient in bounded memory.

    Rows are processed in chunks of at most ``max_elements`` logits. Returns floats:

    - ``loss``: the (one-direction) loss value;
    - ``pos_prob``: mean ``p_i+`` (softmax of the reweighted logits);
    - ``pos_sim`` / ``hardest_neg_sim``: mean positive similarity and mean largest negative one;
    - ``amplification``: mean over rows of ``Σ_neg p̄ / Σ_neg p`` — how much the reweighter scaled
      the negatives' share of the gradient (1 for plain InfoNCE; EGA's amplification);
    - ``amplification_mean``: mean of ``p̄_ij / p_ij`` over all negatives with ``p_ij > 0``;
    - ``removed_fraction``: fraction of negatives removed from the softmax (``z' = −inf``).

    Call it every N steps on detached embeddings; it recomputes the logits.
    """
    rw = reweighter or _PLAIN
    _check_inputs(
        q, c, targets, tile_size=None, symmetric=False, reweighter=reweighter,
        where="loss_diagnostics",
    )
    tau = _check_temperature(temperature, "loss_diagnostics")
    acc = _acc_dtype(q.dtype)
    b, m = q.shape[0], c.shape[0]
    targets = targets.long()
    chunk = max(1, max_elements // max(m, 1))
    c_acc = c.detach().to(acc)
    sums = dict.fromkeys(
        ("loss", "pos_prob", "pos_sim", "hardest_neg_sim", "amplification"), 0.0
    )
    ratio_sum, ratio_count, removed, negatives = 0.0, 0, 0, 0
    rows_with_neg = 0
    for r0 in range(0, b, chunk):
        r1 = min(b, r0 + chunk)
        t = targets[r0:r1]
        rows = torch.arange(r1 - r0, device=q.device)
        z = (q[r0:r1].detach().to(acc) / tau) @ c_acc.T
        z_pos = z[rows, t].unsqueeze(1)
        is_pos = positive_mask(t, 0, m)
        stats = _full_row_stats(rw, z, z_pos, is_pos, tau)
        zt = rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
        lse = torch.logsumexp(zt, dim=1, keepdim=True)
        p = torch.exp(zt - lse)
        pbar = rw.transform_probs(p, z, z_pos, is_pos, temperature=tau, stats=stats)
        neg = ~is_pos
        sums["loss"] += float((lse[:, 0] - zt[rows, t]).sum())
        sums["pos_prob"] += float(p[rows, t].sum())
        sums["pos_sim"] += float(z_pos.sum()) * tau
        if m > 1:
            hardest = torch.where(neg, z, torch.full_like(z, -math.inf)).amax(dim=1)
            sums["hardest_neg_sim"] += float(hardest.sum()) * tau
            mass = torch.where(neg, p, 0.0).sum(dim=1)
            mass_bar = torch.where(neg, pbar, 0.0).sum(dim=1)
            has = mass > 0
            sums["amplification"] += float((mass_bar[has] / mass[has]).sum())
            rows_with_neg += int(has.sum())
            live = neg & (p > 0)
            ratio_sum += float((pbar[live] / p[live]).sum())
            ratio_count += int(live.sum())
            removed += int((neg & torch.isneginf(zt)).sum())
            negatives += int(neg.sum())
    out = {k: v / b for k, v in sums.items()}
    out["amplification"] = sums["amplification"] / rows_with_neg if rows_with_neg else 1.0
    out["amplification_mean"] = ratio_sum / ratio_count if ratio_count else 1.0
    out["removed_fraction"] = removed / negatives if negatives else 0.0
    return out

"""The tiled contrastive loss as PyTorch tiles: any device, any reweighter, float32/float64.

Forward, per block of ``tile`` rows: stream over column tiles of ``tile`` candidates, keeping the
row's running log-sum-exp of the (reweighted) logits and the reweighter's row statistics (one
extra pass first when its logit transform needs them). Backward: recompute each tile, form
``p = exp(z' − lse)``, apply ``transform_probs``, subtract ``y`` and accumulate
``dq += G c`` and ``dc += Gᵀ q``. Never more than a few ``tile × tile`` buffers of logits.

The logits of a tile are computed the same way in every pass (``(q/τ) cᵀ`` on the same slices), so
forward and backward see bit-identical values: a threshold found in one pass selects the same
candidates in the next.

Columns that copy a row's positive (``keys``) are set to −∞ in every pass before anything reads
the tile, so they take part in no statistic, no log-sum-exp and no gradient.
"""

from __future__ import annotations

import torch

from mmemb.loss import DuplicateKeys, Reweighter, RowStats, duplicate_mask, positive_mask
from mmemb.loss.checks import acc_dtype


def positive_logits(
    q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, tau: float, *, chunk: int = 1024
) -> torch.Tensor:
    """``z_i+ = q_i·c_{t_i}/τ`` (B,), in the accumulation dtype, ``chunk`` rows at a time."""
    acc = acc_dtype(q.dtype)
    out = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for r0 in range(0, q.shape[0], chunk):
        r1 = min(q.shape[0], r0 + chunk)
        qs = q[r0:r1].to(acc) / tau
        out[r0:r1] = (qs * c[targets[r0:r1]].to(acc)).sum(dim=1)
    return out


def _row_logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 with the row max as the shift, overwriting ``z``."""
    m = z.amax(dim=1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return z.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)


def _safe_lse(
    qs: torch.Tensor,
    c_acc: torch.Tensor,
    t: torch.Tensor,
    zp: torch.Tensor,
    stats: RowStats,
    tau: float,
    rw: Reweighter,
    tile: int,
    keys: DuplicateKeys | None,
) -> torch.Tensor:
    """Row log-sum-exp with a running max per tile: the exact fallback of the shifted sum."""
    running: torch.Tensor | None = None
    for c0 in range(0, c_acc.shape[0], tile):
        c1 = min(c_acc.shape[0], c0 + tile)
        is_pos = positive_mask(t, c0, c1)
        z = _masked(qs @ c_acc[c0:c1].T, duplicate_mask(keys, t, c0, c1, is_pos=is_pos))
        if rw.transforms_logits:
            z = rw.transform_logits(z, zp, is_pos, temperature=tau, stats=stats)
        part = _row_logsumexp_(z)
        running = part if running is None else torch.logaddexp(running, part)
    assert running is not None
    return running


def _masked(z: torch.Tensor, dup: torch.Tensor | None) -> torch.Tensor:
    """``z`` with the duplicate-positive columns at −∞ (in place)."""
    return z if dup is None else z.masked_fill_(dup, -torch.inf)


def forward(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    z_pos: torch.Tensor,
    tau: float,
    rw: Reweighter,
    tile: int,
    keys: DuplicateKeys | None = None,
) -> tuple[torch.Tensor, RowStats]:
    """Per-row log-sum-exp of the reweighted logits (B,) and the finalised row statistics.

    Every tile of a row is shifted by the row's positive logit ``z_i+`` (known before the loop),
    ``lse_i = z_i+ + log Σ_j exp(z'_ij − z_i+)``: no per-tile max, so a tile costs a matmul, an exp
    and a sum. The row max is at least ``z_i+`` when the reweighter keeps the positive's logit
    (all built-in ones do), so the sum is at least 1 and cannot underflow; a row whose sum
    overflows (a negative more than ~88 logits above its positive) or falls below 1e-30 is
    recomputed with a running max per tile.
    """
    b, m = q.shape[0], c.shape[0]
    acc = acc_dtype(q.dtype)
    c_acc = c.detach().to(acc)
    lse = torch.empty(b, dtype=acc, device=q.device)
    need_pos = rw.transforms_logits or rw.has_row_stats or keys is not None
    parts: list[RowStats] = []
    for r0 in range(0, b, tile):
        r1 = min(b, r0 + tile)
        q_r = q[r0:r1].detach().to(acc)  # a view for float32/float64 inputs
        qs = q_r / tau if need_pos else q_r
        t = targets[r0:r1]
        zp = z_pos[r0:r1, None]
        keys_r = None if keys is None else keys.rows_slice(r0, r1)
        stats: RowStats = {}
        if rw.has_row_stats:
            stats = rw.init_row_stats(r1 - r0, device=q.device, dtype=acc)
            if rw.logits_use_stats:
                for c0 in range(0, m, tile):
                    c1 = min(m, c0 + tile)
                    is_pos = positive_mask(t, c0, c1)
                    z = _masked(qs @ c_acc[c0:c1].T,
                                duplicate_mask(keys_r, t, c0, c1, is_pos=is_pos))
                    stats = rw.update_row_stats(stats, z, zp, is_pos, temperature=tau)
                stats = rw.finalize_row_stats(stats, temperature=tau)
        total = torch.zeros(r1 - r0, dtype=acc, device=q.device)
        neg_zp = -zp
        for c0 in range(0, m, tile):
            c1 = min(m, c0 + tile)
            if need_pos:
                is_pos = positive_mask(t, c0, c1)
                z = _masked(qs @ c_acc[c0:c1].T, duplicate_mask(keys_r, t, c0, c1, is_pos=is_pos))
                if rw.has_row_stats and not rw.logits_use_stats:
                    stats = rw.update_row_stats(stats, z, zp, is_pos, temperature=tau)
                if rw.transforms_logits:
                    z = rw.transform_logits(z, zp, is_pos, temperature=tau, stats=stats)
                z = z - zp
            else:
                z = torch.addmm(neg_zp, q_r, c_acc[c0:c1].T, alpha=1.0 / tau)  # z − z_i+, one op
            total += z.exp_().sum(dim=1)
        if rw.has_row_stats and not rw.logits_use_stats:
            stats = rw.finalize_row_stats(stats, temperature=tau)
        lse_r = total.log() + z_pos[r0:r1]
        bad = ~torch.isfinite(lse_r) | (total < 1e-30)
        if bool(bad.any()):
            idx = bad.nonzero()[:, 0]
            lse_r[idx] = _safe_lse(
                q_r[idx] / tau, c_acc, t[idx], zp[idx], {k: v[idx] for k, v in stats.items()},
                tau, rw, tile,
                None if keys_r is None else DuplicateKeys(keys_r.rows[idx], keys_r.cols),
            )
        lse[r0:r1] = lse_r
        parts.append(stats)
    names = list(parts[0]) if parts else []
    return lse, {k: torch.cat([s[k] for s in parts]) for k in names}


def backward(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    z_pos: torch.Tensor,
    lse: torch.Tensor,
    stats: RowStats,
    scale: torch.Tensor,
    tau: float,
    rw: Reweighter,
    tile: int,
    keys: DuplicateKeys | None = None,
    *,
    need_dq: bool,
    need_dc: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dq = G c / τ`` and ``dc = Gᵀ q / τ`` with ``G = scale·(p̄ − y)``, in the accumulation dtype.

    ``scale`` is the 0-dim upstream gradient divided by B.
    """
    b, m = q.shape[0], c.shape[0]
    acc = acc_dtype(q.dtype)
    c_acc = c.detach().to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if need_dq else None
    dc = torch.zeros(c.shape, dtype=acc, device=c.device) if need_dc else None
    if dq is None and dc is None:
        return None, None
    g = float(scale)
    need_pos = rw.transforms_logits or rw.transforms_probs or keys is not None
    for r0 in range(0, b, tile):
        r1 = min(b, r0 + tile)
        q_r = q[r0:r1].detach().to(acc)  # a view for float32/float64 inputs
        qs = q_r / tau if need_pos else q_r
        t = targets[r0:r1]
        zp = z_pos[r0:r1, None]
        lse_r = lse[r0:r1, None]
        neg_lse = -lse_r
        stats_r = {k: v[r0:r1] for k, v in stats.items()}
        rows = torch.arange(r1 - r0, device=q.device)
        keys_r = None if keys is None else keys.rows_slice(r0, r1)
        for c0 in range(0, m, tile):
            c1 = min(m, c0 + tile)
            cc = c_acc[c0:c1]
            if need_pos:
                is_pos = positive_mask(t, c0, c1)
                z = _masked(qs @ cc.T, duplicate_mask(keys_r, t, c0, c1, is_pos=is_pos))
                zt = (
                    rw.transform_logits(z, zp, is_pos, temperature=tau, stats=stats_r)
                    if rw.transforms_logits
                    else z
                )
                if rw.transforms_probs:
                    p = torch.exp(zt - lse_r)
                    p = rw.transform_probs(p, z, zp, is_pos, temperature=tau, stats=stats_r)
                else:
                    p = zt.sub_(lse_r).exp_()
            else:
                p = torch.addmm(neg_lse, q_r, cc.T, alpha=1.0 / tau).exp_()  # exp(z − lse)
            # subtract y where this tile holds the row's positive
            local = t - c0
            inside = (local >= 0) & (local < c1 - c0)
            p.index_put_(
                (rows, local.clamp(0, c1 - c0 - 1)), -inside.to(acc), accumulate=True
            )
            if dq is not None:
                dq[r0:r1].addmm_(p, cc, alpha=g / tau)
            if dc is not None:
                dc[c0:c1].addmm_(p.T, q_r, alpha=g / tau)
    return dq, dc

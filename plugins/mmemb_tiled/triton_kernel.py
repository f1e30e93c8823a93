"""The tiled contrastive loss as fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1).

Same algorithm as :mod:`mmemb_tiled.torch_tiles`, with the tile matmul, the exp, the reweighting
and the gradient accumulation fused in one kernel per pass, for the reweighters that describe
themselves as a :class:`mmemb.loss.FusedForm` (none, ega, llave, topk_mask):

- ``_fwd_kernel`` (one program per block of BM rows): streams over column blocks of BN candidates;
  each logits tile is ``Σ_k q[:, k-chunk] · c[:, k-chunk]ᵀ`` over BK-wide chunks of D (fp32
  accumulation; IEEE fp32 products for fp32 inputs), then keeps the running max and sum-exp of the
  reweighted logits, EGA's ``normalize`` masses, or (pass 1 of ``topk_mask``) a top-k buffer.
- ``_dq_kernel`` (per row block) and ``_dc_kernel`` (per column block): recompute the tile, form
  ``G = scale·(p̄ − y)`` and accumulate ``G c / τ`` into the program's own rows of dq, or
  ``Gᵀ q / τ`` into its own rows of dc, D-chunk by D-chunk in fp32 (no atomics). For bf16/fp16
  inputs G is rounded to the input dtype for the gradient matmul (as flash-attention does).

Every pass computes a tile with the same helper, the same block shape and the same chunk order,
so the logits a threshold was taken from are bit-identical to the ones it is applied to.

Duplicate positives (``DUP``): each row's positive key (B,) and each column's key (M,), int64, are
compared per tile; a column whose key equals the row's, other than the positive itself, is set to
−∞ right after the tile is computed, in every pass, before the exp, the reweighting or any row
statistic reads it — so it gets no probability, no gradient and no place in a top-k or a mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mmemb.loss import FusedForm

KIND_NONE, KIND_EGA, KIND_LLAVE, KIND_TOPK = 0, 1, 2, 3
_KINDS = {"none": KIND_NONE, "ega": KIND_EGA, "llave": KIND_LLAVE, "topk_mask": KIND_TOPK}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TOPK = 128


@dataclass(frozen=True)
class Blocks:
    """Block sizes: BM rows × BN columns per tile, BK-wide chunks of the embedding dimension."""

    bm: int = 64
    bn: int = 64
    bk: int = 64
    num_warps: int = 4
    num_stages: int = 2


def supports(form: FusedForm | None, dtype: torch.dtype) -> bool:
    """Whether the fused kernel implements this reweighter form and input dtype."""
    if form is None or form.kind not in _KINDS or dtype not in SUPPORTED_DTYPES:
        return False
    return not (form.kind == "topk_mask" and form.k > MAX_TOPK)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    Q, C, offs_m, offs_n, row_ok, col_ok, D,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """s = q[offs_m] · c[offs_n]ᵀ (BM, BN), fp32, summed over D in BK-wide chunks."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    q_rows = offs_m.to(tl.int64)[:, None] * D
    c_rows = offs_n.to(tl.int64)[:, None] * D
    for k0 in range(0, D, BK):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(Q + q_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(C + c_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _mask_duplicates(z, RK, CK, offs_m, offs_n, row_ok, col_ok, is_pos, DUP: tl.constexpr):
    """z with the columns that copy each row's positive (equal keys, not the positive) at −∞."""
    if DUP:
        rk = tl.load(RK + offs_m, mask=row_ok, other=0)
        ck = tl.load(CK + offs_n, mask=col_ok, other=0)
        dup = (rk[:, None] == ck[None, :]) & ~is_pos & col_ok[None, :]
        z = tl.where(dup, float("-inf"), z)
    return z


@triton.jit
def _reweighted_logits(
    z, s, zp, is_neg, thr, tau, lam, delta, tie_tol,
    KIND: tl.constexpr,
):
    """z' for the forward: LLaVE's offset, or topk_mask's removal (−inf)."""
    if KIND == 2:
        z = tl.where(is_neg, z + lam * s, z)
    if KIND == 3:
        keep = ((z - zp[:, None]) * tau <= delta + tie_tol) & ((z - thr[:, None]) * tau >= -tie_tol)
        z = tl.where(is_neg & ~keep, float("-inf"), z)
    return z


@triton.jit
def _hardness(z, zp, tau, inv_tau_h, margin, fn_margin, LINEAR: tl.constexpr, FN: tl.constexpr):
    """EGA's h_ij in [0, 1]."""
    diff = (z - zp[:, None]) * tau
    if LINEAR:
        h = tl.minimum(tl.maximum((diff + margin) / margin, 0.0), 1.0)
    else:
        h = tl.exp(tl.minimum(diff * inv_tau_h, 0.0))
    if FN:
        h = tl.where(diff > fn_margin, 0.0, h)
    return h


@triton.jit
def _row_stats(
    THR, RATIO, offs_m, row_ok, BM: tl.constexpr, KIND: tl.constexpr, NORM: tl.constexpr
):
    """The rows' top-k threshold (−inf when unused) and EGA normalisation ratio (1 when unused)."""
    if KIND == 3:
        thr = tl.load(THR + offs_m, mask=row_ok, other=float("-inf"))
    else:
        thr = tl.full((BM,), float("-inf"), tl.float32)
    if NORM:
        ratio = tl.load(RATIO + offs_m, mask=row_ok, other=1.0)
    else:
        ratio = tl.full((BM,), 1.0, tl.float32)
    return thr, ratio


@triton.jit
def _grad_tile(
    s, RK, CK, offs_m, offs_n, row_ok, col_ok, tgt, zp, lse, thr, ratio, scale,
    inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
    KIND: tl.constexpr, LINEAR: tl.constexpr, FN: tl.constexpr, NORM: tl.constexpr,
    DUP: tl.constexpr,
):
    """G = scale·(p̄ − y) for one tile, zero outside the matrix and at masked duplicates."""
    is_pos = offs_n[None, :] == tgt[:, None]
    z = _mask_duplicates(s * inv_tau, RK, CK, offs_m, offs_n, row_ok, col_ok, is_pos, DUP)
    is_neg = col_ok[None, :] & ~is_pos
    zt = _reweighted_logits(z, s, zp, is_neg, thr, tau, lam, delta, tie_tol, KIND)
    p = tl.exp(zt - lse[:, None])
    if KIND == 1:
        w = 1.0 + alpha * _hardness(z, zp, tau, inv_tau_h, margin, fn_margin, LINEAR, FN)
        if NORM:
            w = w * ratio[:, None]
        p = tl.where(is_neg, p * w, p)
    g = p - is_pos.to(tl.float32)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    return g * scale


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, C, T, ZP, THR, LSE, RATIO, RK, CK,
    B, M, D, k_sel,
    inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
    KIND: tl.constexpr, TOPK_PASS: tl.constexpr, KP: tl.constexpr,
    LINEAR: tl.constexpr, FN: tl.constexpr, NORM: tl.constexpr, DUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    row_ok = offs_m < B
    tgt = tl.load(T + offs_m, mask=row_ok, other=-1)
    zp = tl.load(ZP + offs_m, mask=row_ok, other=0.0)
    thr = tl.full((BM,), float("-inf"), tl.float32)
    if KIND == 3:  # noqa: SIM102 (constexpr branches read best one per line in Triton)
        if not TOPK_PASS:
            thr = tl.load(THR + offs_m, mask=row_ok, other=float("-inf"))
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    mass = tl.zeros((BM,), tl.float32)
    hard = tl.zeros((BM,), tl.float32)
    best = tl.full((BM, KP), float("-inf"), tl.float32)
    for n0 in range(0, M, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_ok = offs_n < M
        s = _logits_tile(Q, C, offs_m, offs_n, row_ok, col_ok, D, BM, BN, BK, IEEE)
        is_pos = offs_n[None, :] == tgt[:, None]
        z = _mask_duplicates(s * inv_tau, RK, CK, offs_m, offs_n, row_ok, col_ok, is_pos, DUP)
        is_neg = col_ok[None, :] & ~is_pos
        if TOPK_PASS:
            kept = is_neg & ((z - zp[:, None]) * tau <= delta + tie_tol)
            fresh = tl.where(kept, z, float("-inf"))
            top = tl.topk(fresh, KP, dim=1)
            both = tl.reshape(tl.join(best, top), (BM, 2 * KP))
            best = tl.topk(both, KP, dim=1)
        else:
            zt = _reweighted_logits(z, s, zp, is_neg, thr, tau, lam, delta, tie_tol, KIND)
            zt = tl.where(col_ok[None, :], zt, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(zt, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            decay = tl.exp(m_i - m_safe)
            e = tl.exp(zt - m_safe[:, None])
            l_i = l_i * decay + tl.sum(e, 1)
            if NORM:
                e_neg = tl.where(is_neg, e, 0.0)
                h = _hardness(z, zp, tau, inv_tau_h, margin, fn_margin, LINEAR, FN)
                mass = mass * decay + tl.sum(e_neg, 1)
                hard = hard * decay + tl.sum(e_neg * h, 1)
            m_i = m_new
    if TOPK_PASS:
        idx = tl.arange(0, KP)
        kth = tl.max(tl.where(idx[None, :] == k_sel - 1, best, float("-inf")), 1)
        tl.store(THR + offs_m, kth, mask=row_ok)
    else:
        tl.store(LSE + offs_m, m_i + tl.log(l_i), mask=row_ok)
        if NORM:
            amplified = mass + alpha * hard
            ratio = tl.where(mass > 0, mass / tl.where(mass > 0, amplified, 1.0), 1.0)
            tl.store(RATIO + offs_m, ratio, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, C, T, ZP, LSE, THR, RATIO, SCALE, RK, CK, DQ,
    B, M, D,
    inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
    KIND: tl.constexpr, LINEAR: tl.constexpr, FN: tl.constexpr, NORM: tl.constexpr,
    DUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    row_ok = offs_m < B
    tgt = tl.load(T + offs_m, mask=row_ok, other=-1)
    zp = tl.load(ZP + offs_m, mask=row_ok, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    thr, ratio = _row_stats(THR, RATIO, offs_m, row_ok, BM, KIND, NORM)
    scale = tl.load(SCALE)
    offs_k = tl.arange(0, BK)
    q_rows = offs_m.to(tl.int64)[:, None] * D
    for n0 in range(0, M, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_ok = offs_n < M
        s = _logits_tile(Q, C, offs_m, offs_n, row_ok, col_ok, D, BM, BN, BK, IEEE)
        g = _grad_tile(
            s, RK, CK, offs_m, offs_n, row_ok, col_ok, tgt, zp, lse, thr, ratio, scale,
            inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
            KIND, LINEAR, FN, NORM, DUP,
        )
        g = g * inv_tau
        if not IEEE:
            g = g.to(C.dtype.element_ty)
        c_rows = offs_n.to(tl.int64)[:, None] * D
        for k0 in range(0, D, BK):
            kk = k0 + offs_k
            k_ok = kk < D
            cb = tl.load(C + c_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:  # noqa: SIM108
                upd = tl.dot(g, cb, input_precision="ieee")
            else:
                upd = tl.dot(g, cb)
            ptr = DQ + q_rows + kk[None, :]
            ok = row_ok[:, None] & k_ok[None, :]
            tl.store(ptr, tl.load(ptr, mask=ok, other=0.0) + upd, mask=ok)


@triton.jit
def _dc_kernel(
    Q, C, T, ZP, LSE, THR, RATIO, SCALE, RK, CK, DC,
    B, M, D,
    inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
    KIND: tl.constexpr, LINEAR: tl.constexpr, FN: tl.constexpr, NORM: tl.constexpr,
    DUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    col_ok = offs_n < M
    scale = tl.load(SCALE)
    offs_k = tl.arange(0, BK)
    c_rows = offs_n.to(tl.int64)[:, None] * D
    for m0 in range(0, B, BM):
        offs_m = m0 + tl.arange(0, BM)
        row_ok = offs_m < B
        tgt = tl.load(T + offs_m, mask=row_ok, other=-1)
        zp = tl.load(ZP + offs_m, mask=row_ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        thr, ratio = _row_stats(THR, RATIO, offs_m, row_ok, BM, KIND, NORM)
        s = _logits_tile(Q, C, offs_m, offs_n, row_ok, col_ok, D, BM, BN, BK, IEEE)
        g = _grad_tile(
            s, RK, CK, offs_m, offs_n, row_ok, col_ok, tgt, zp, lse, thr, ratio, scale,
            inv_tau, tau, lam, delta, tie_tol, alpha, inv_tau_h, margin, fn_margin,
            KIND, LINEAR, FN, NORM, DUP,
        )
        g = tl.trans(g * inv_tau)
        if not IEEE:
            g = g.to(Q.dtype.element_ty)
        q_rows = offs_m.to(tl.int64)[:, None] * D
        for k0 in range(0, D, BK):
            kk = k0 + offs_k
            k_ok = kk < D
            qa = tl.load(Q + q_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:  # noqa: SIM108
                upd = tl.dot(g, qa, input_precision="ieee")
            else:
                upd = tl.dot(g, qa)
            ptr = DC + c_rows + kk[None, :]
            ok = col_ok[:, None] & k_ok[None, :]
            tl.store(ptr, tl.load(ptr, mask=ok, other=0.0) + upd, mask=ok)


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    kind: int
    lam: float
    delta: float
    tie_tol: float
    alpha: float
    inv_tau_h: float
    margin: float
    fn_margin: float
    linear: bool
    fn: bool
    norm: bool
    k: int
    kp: int


def _params(form: FusedForm, tau: float) -> _Params:
    kind = _KINDS[form.kind]
    ega = kind == KIND_EGA
    k = form.k if kind == KIND_TOPK else 0
    return _Params(
        kind=kind,
        lam=form.alpha if kind == KIND_LLAVE else 0.0,
        delta=form.delta if kind == KIND_TOPK else 0.0,
        tie_tol=form.tie_tol if kind == KIND_TOPK else 0.0,
        alpha=form.alpha if ega else 0.0,
        inv_tau_h=1.0 / (form.tau_h if form.tau_h is not None else tau),
        margin=form.margin,
        fn_margin=form.fn_margin if form.fn_margin is not None else 0.0,
        linear=ega and form.hardness == "linear",
        fn=ega and form.fn_margin is not None,
        norm=ega and form.normalize,
        k=k,
        kp=max(1, 1 << max(0, math.ceil(math.log2(k)))) if k else 1,
    )


def _blocks_for(blocks: Blocks, prm: _Params) -> Blocks:
    bn = max(blocks.bn, prm.kp) if prm.kind == KIND_TOPK else blocks.bn
    return Blocks(blocks.bm, bn, blocks.bk, blocks.num_warps, blocks.num_stages)


def _launch_opts(blocks: Blocks) -> dict[str, int]:
    return {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}


def _key_args(
    keys: tuple[torch.Tensor, torch.Tensor] | None, b: int, m: int, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(row keys, column keys, DUP) for a launch. Without keys the kernels never read the two
    pointers (DUP is a compile-time False), so any int64 tensor on the device stands in."""
    if keys is None:
        return placeholder, placeholder, False
    rk, ck = keys
    if rk.shape != (b,) or ck.shape != (m,):
        raise ValueError(f"duplicate keys must be ({b},) and ({m},), got {tuple(rk.shape)} and "
                         f"{tuple(ck.shape)}")
    dev = placeholder.device
    return (rk.to(device=dev, dtype=torch.int64).contiguous(),
            ck.to(device=dev, dtype=torch.int64).contiguous(), True)


def forward(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    z_pos: torch.Tensor,
    tau: float,
    form: FusedForm,
    blocks: Blocks = Blocks(),
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row log-sum-exp (B,) fp32 and the row statistics the backward needs.

    ``keys``: (each row's positive key (B,), each column's key (M,)), int64, to mask the columns
    that copy a row's positive; None masks nothing."""
    q, c = q.detach().contiguous(), c.detach().contiguous()
    b, d = q.shape
    m = c.shape[0]
    prm = _params(form, tau)
    blk = _blocks_for(blocks, prm)
    dev = q.device
    lse = torch.empty(b, dtype=torch.float32, device=dev)
    thr = torch.full((b,), -math.inf, dtype=torch.float32, device=dev)
    ratio = torch.ones(b, dtype=torch.float32, device=dev)
    zp = z_pos.detach().float().contiguous()
    t = targets.contiguous()
    rk, ck, dup = _key_args(keys, b, m, t)
    grid = (triton.cdiv(b, blk.bm),)
    common = dict(
        B=b, M=m, D=d, k_sel=max(prm.k, 1),
        inv_tau=1.0 / tau, tau=tau, lam=prm.lam, delta=prm.delta, tie_tol=prm.tie_tol,
        alpha=prm.alpha,
        inv_tau_h=prm.inv_tau_h, margin=prm.margin, fn_margin=prm.fn_margin,
        KIND=prm.kind, KP=prm.kp, LINEAR=prm.linear, FN=prm.fn, NORM=prm.norm, DUP=dup,
        BM=blk.bm, BN=blk.bn, BK=blk.bk, IEEE=q.dtype == torch.float32,
    )
    if prm.kind == KIND_TOPK:
        _fwd_kernel[grid](q, c, t, zp, thr, lse, ratio, rk, ck, TOPK_PASS=True, **common,
                          **_launch_opts(blk))
    _fwd_kernel[grid](q, c, t, zp, thr, lse, ratio, rk, ck, TOPK_PASS=False, **common,
                      **_launch_opts(blk))
    return lse, {"threshold": thr, "ratio": ratio}


def backward(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    z_pos: torch.Tensor,
    lse: torch.Tensor,
    stats: dict[str, torch.Tensor],
    scale: torch.Tensor,
    tau: float,
    form: FusedForm,
    blocks: Blocks = Blocks(),
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    need_dq: bool,
    need_dc: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``dq = G c / τ`` and ``dc = Gᵀ q / τ`` with ``G = scale·(p̄ − y)`` (``keys`` as in
    :func:`forward`: masked duplicates get ``G = 0``)."""
    q, c = q.detach().contiguous(), c.detach().contiguous()
    b, d = q.shape
    m = c.shape[0]
    prm = _params(form, tau)
    blk = _blocks_for(blocks, prm)
    zp = z_pos.detach().float().contiguous()
    scale_t = scale.detach().float().reshape(1).contiguous()
    t = targets.contiguous()
    rk, ck, dup = _key_args(keys, b, m, t)
    args = (q, c, t, zp, lse, stats["threshold"], stats["ratio"], scale_t, rk, ck)
    common = dict(
        B=b, M=m, D=d,
        inv_tau=1.0 / tau, tau=tau, lam=prm.lam, delta=prm.delta, tie_tol=prm.tie_tol,
        alpha=prm.alpha,
        inv_tau_h=prm.inv_tau_h, margin=prm.margin, fn_margin=prm.fn_margin,
        KIND=prm.kind, LINEAR=prm.linear, FN=prm.fn, NORM=prm.norm, DUP=dup,
        BM=blk.bm, BN=blk.bn, BK=blk.bk, IEEE=q.dtype == torch.float32,
    )
    dq = dc = None
    if need_dq:
        dq = torch.zeros((b, d), dtype=torch.float32, device=q.device)
        _dq_kernel[(triton.cdiv(b, blk.bm),)](*args, dq, **common, **_launch_opts(blk))
    if need_dc:
        dc = torch.zeros((m, d), dtype=torch.float32, device=q.device)
        _dc_kernel[(triton.cdiv(m, blk.bn),)](*args, dc, **common, **_launch_opts(blk))
    return dq, dc

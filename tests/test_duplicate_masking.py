"""Duplicate positives are masked: full matrix = PyTorch tiles = an independent float64 reference.

A batch where several candidates copy a query's positive (same content key, same embedding):
three queries share one class-name positive, a mined negative is a copy of its own query's
positive, another query's negative copies a different query's positive. For every reweighter the
reference below writes the loss out directly — a cross-entropy whose copied columns are −∞ in
the row, with each reweighter's formula as tests/test_reweighters.py writes it — and the full
matrix and the PyTorch tiles must agree with it in float64, for several tile sizes, symmetric or
not. The Triton kernel is compared with the PyTorch tiles with keys in tests/test_tiled_triton.py.

A 2-process gloo test puts a copy of rank 0's positive on rank 1: the gathered loss's gradients
equal the single-process ones, and the copy gets no gradient from rank 0's row.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_impls import impl

import mmemb.loss as L
from mmemb import plugins
from mmemb.train.testing import run_workers

TAU = 0.05
TOPK_TIE = 1e-5  # topk_mask's documented tie tolerance in similarity (mmemb_ega.topk.TIE_TOL)
B, K, D = 8, 2, 6
M = B + B * K
TILES = (1, 3, 5, 64)
REWEIGHTERS = [
    ("none", {}),
    ("ega", {"alpha": 2.0}),
    ("ega", {"alpha": 3.0, "tau_h": 0.1, "normalize": True, "fn_margin": 0.0}),
    ("ega", {"hardness": "linear", "margin": 0.5, "normalize": True}),
    ("llave", {"alpha": 9.0}),
    ("topk_mask", {"k": 3, "delta": 0.05}),
    ("topk_mask", {"k": 1, "delta": 0.0}),
    ("topk_mask", {"k": 30, "delta": 0.1}),  # fewer than k negatives: nothing truncated
]
IDS = [f"{n}{i}" for i, (n, _) in enumerate(REWEIGHTERS)]


def neg_col(query: int, j: int) -> int:
    """The column of query ``query``'s j-th hard negative in the collator's layout."""
    return B + query * K + j


# (copy column, original column): what the batch duplicates
COPIES = [(3, 0), (5, 0), (neg_col(4, 0), 0), (neg_col(2, 0), 2), (neg_col(6, 1), 1)]
MASKED = 3 * 3 + 1 + 1  # rows 0, 3, 5 mask the other two positives and query 4's negative


def duplicate_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, c, targets, keys) in float64 with the copies in COPIES (same embedding and key)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    keys = torch.arange(M, dtype=torch.int64) * 7919 + 13
    for copy, original in COPIES:
        c[copy] = c[original]
        keys[copy] = keys[original]
    return q, c, torch.arange(B), keys


# ---------------------------------------------------------------------------------- reference


def _direction(x, y, t, key_rows, key_cols, name, options):
    """(loss value, surrogate whose autograd gradient is the reweighted one) of one direction."""
    b, m = x.shape[0], y.shape[0]
    s = x @ y.T
    z = s / TAU
    is_pos = torch.zeros(b, m, dtype=torch.bool)
    is_pos[torch.arange(b), t] = True
    dup = (key_rows[:, None] == key_cols[None, :]) & ~is_pos
    neg = ~is_pos & ~dup
    s_pos = s.detach()[torch.arange(b), t][:, None]
    if name == "llave":
        z = z + options["alpha"] * s.detach() * neg
    if name == "topk_mask":
        keep = is_pos.clone()
        sd = s.detach()
        for i in range(b):
            cand = [j for j in range(m) if neg[i, j] and sd[i, j] <= s_pos[i] + options["delta"]
                    + TOPK_TIE]
            vals = sorted((float(sd[i, j]) for j in cand), reverse=True)
            kth = vals[options["k"] - 1] if len(vals) >= options["k"] else -float("inf")
            for j in cand:
                keep[i, j] = bool(sd[i, j] >= kth - TOPK_TIE)
        z = z.masked_fill(~keep, -torch.inf)
    z = z.masked_fill(dup, -torch.inf)
    value = F.cross_entropy(z, t)
    if name != "ega":
        return value, value
    # EGA: the value is plain (masked) InfoNCE; the logits gradient is (p̄ − y)/B
    p = torch.softmax(z.detach(), dim=1)
    diff = s.detach() - s_pos
    if options.get("hardness", "exp") == "exp":
        h = torch.exp(diff / (options.get("tau_h") or TAU)).clamp(max=1.0)
    else:
        h = ((diff + options["margin"]) / options["margin"]).clamp(0.0, 1.0)
    if options.get("fn_margin") is not None:
        h = torch.where(diff > options["fn_margin"], torch.zeros_like(h), h)
    pbar = p * (1.0 + options.get("alpha", 1.0) * h)
    if options.get("normalize", True):  # EGAConfig's default
        pbar = pbar * (p * neg).sum(1, keepdim=True) / (pbar * neg).sum(1, keepdim=True)
    pbar = torch.where(neg, pbar, p)
    surrogate = ((pbar - is_pos.double()) * (s / TAU).masked_fill(dup, 0.0)).sum() / b
    return value, surrogate


def reference(q, c, t, keys, name, options, *, symmetric):
    """(loss, dq, dc) of the masked loss, written out directly and differentiated by autograd."""
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    value, sur = _direction(q, c, t, keys[t], keys, name, options)
    if symmetric:
        rv, rs = _direction(c[t], q, torch.arange(len(t)), keys[t], keys[t], name, options)
        value, sur = 0.5 * (value + rv), 0.5 * (sur + rs)
    sur.backward()
    return value.detach(), q.grad, c.grad


def run(q, c, t, keys, rw, *, tile, symmetric):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = L.contrastive_loss(q, c, t, temperature=TAU, reweighter=rw, keys=keys,
                              impl=impl(tile), symmetric=symmetric)
    loss.backward()
    return loss.detach(), q.grad, c.grad


def _close(got, ref, msg=""):
    for what, g, r in zip(("loss", "dq", "dc"), got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=lambda s, w=what: f"{msg} "
                                   f"{w}: {s}")


# ------------------------------------------------------------------------------------- tests


def test_the_batch_holds_the_duplicates_it_claims():
    q, c, t, keys = duplicate_batch()
    assert L.count_duplicates(L.DuplicateKeys.for_candidates(keys, t)) == MASKED
    mask = L.duplicate_mask(L.DuplicateKeys.for_candidates(keys, t), t, 0, M)
    assert mask is not None and int(mask.sum()) == MASKED
    assert mask[4, neg_col(4, 0)] == 0 and mask[0, neg_col(4, 0)] == 1
    # a copy scores exactly like the positive it copies: hardness 1 if it were a negative
    assert torch.equal(q[2] @ c[neg_col(2, 0)], q[2] @ c[2])


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize(("name", "options"), REWEIGHTERS, ids=IDS)
def test_full_and_tiles_equal_the_masked_reference(name, options, symmetric):
    q, c, t, keys = duplicate_batch(seed=len(options))
    rw = plugins.build("reweighter", name, **options)
    ref = reference(q, c, t, keys, name, options, symmetric=symmetric)
    for tile in (None, *TILES):
        _close(run(q, c, t, keys, rw, tile=tile, symmetric=symmetric), ref, f"tile={tile}")


@pytest.mark.parametrize(("name", "options"), REWEIGHTERS, ids=IDS)
def test_masking_changes_the_gradient(name, options):
    """Without keys the copies are negatives: the result must differ (else the tests above
    would pass with a no-op mask)."""
    q, c, t, keys = duplicate_batch()
    rw = plugins.build("reweighter", name, **options)
    masked = run(q, c, t, keys, rw, tile=3, symmetric=False)
    plain = run(q, c, t, None, rw, tile=3, symmetric=False)
    assert not torch.allclose(masked[2], plain[2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tile", [None, 3])
def test_a_copy_gets_no_gradient_from_the_row_it_copies(tile):
    """Row 4's hard negative copies row 0's positive. Moving q_0 changes row 0 only, so the
    copy's gradient must not move: row 0 contributes nothing to it."""
    q, c, t, keys = duplicate_batch()
    ega = plugins.build("reweighter", "ega", alpha=2.0)
    col = neg_col(4, 0)
    moved = q.clone()
    moved[0] = F.normalize(torch.randn(D, dtype=torch.float64), dim=-1)
    with_keys = [run(x, c, t, keys, ega, tile=tile, symmetric=False)[2][col] for x in (q, moved)]
    torch.testing.assert_close(with_keys[0], with_keys[1], rtol=1e-12, atol=1e-15)
    without = [run(x, c, t, None, ega, tile=tile, symmetric=False)[2][col] for x in (q, moved)]
    assert not torch.allclose(without[0], without[1])


# ------------------------------------------------------------------------- two gloo processes

WORLD = 2
SIZES = (3, 4)  # queries per rank
DIST_SCENARIOS = [  # (reweighter, options, tile_size, symmetric)
    ("none", {}, None, False),
    ("ega", {"alpha": 2.0, "normalize": True, "fn_margin": 0.0}, 3, True),
    ("llave", {"alpha": 9.0}, None, True),
    ("topk_mask", {"k": 2, "delta": 0.05}, 4, False),
]


def _rank_batches():
    """Each rank's (q, c, keys) in the collator's layout (K negatives per query), float64.

    Rank 1's query 0 has a hard negative that copies rank 0's query 0 positive; rank 0's
    query 1 and rank 1's query 2 have copies of one positive (a shared class name)."""
    g = torch.Generator().manual_seed(99)
    out = []
    for r, n in enumerate(SIZES):
        q = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
        c = F.normalize(torch.randn(n + n * K, D, generator=g, dtype=torch.float64), dim=-1)
        keys = torch.arange(n + n * K, dtype=torch.int64) + 1000 * (r + 1)
        out.append([q, c, keys])
    (_, c0, k0), (_, c1, k1) = out
    copy = SIZES[1] + 0 * K + 0  # rank 1, query 0's first negative
    c1[copy], k1[copy] = c0[0], k0[0]
    c1[2], k1[2] = c0[1], k0[1]
    return out, copy


def _gathered(rank, q, c, keys, rw, tile, symmetric):
    q = q.clone().requires_grad_()
    c = c.clone().requires_grad_()
    loss = L.gathered_contrastive_loss(q, c, torch.arange(q.shape[0]), temperature=TAU,
                                       reweighter=rw, keys=keys, impl=impl(tile),
                                       symmetric=symmetric)
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    # the all-gather's backward sums over ranks: embedding gradients are WORLD × the
    # single-process ones (DDP's averaging of parameter gradients divides it out)
    return value / WORLD, q.grad / WORLD, c.grad / WORLD


def _worker(rank: int, world: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches, copy = _rank_batches()
        q_all = torch.cat([b[0] for b in batches])
        c_all = torch.cat([b[1] for b in batches])
        k_all = torch.cat([b[2] for b in batches])
        sizes_c = [b[1].shape[0] for b in batches]
        t_all = torch.cat([torch.arange(n) + sum(sizes_c[:r]) for r, n in enumerate(SIZES)])
        q_lo = sum(SIZES[:rank])
        c_lo = sum(sizes_c[:rank])
        q, c, keys = batches[rank]
        for name, options, tile, symmetric in DIST_SCENARIOS:
            where = f"rank {rank}: {name} {options} tile={tile} symmetric={symmetric}"
            rw = plugins.build("reweighter", name, **options)
            value, dq, dc = _gathered(rank, q, c, keys, rw, tile, symmetric)

            single = run(q_all, c_all, t_all, k_all, rw, tile=None, symmetric=symmetric)
            ref = reference(q_all, c_all, t_all, k_all, name, options, symmetric=symmetric)
            got = (value, dq, dc)
            for expected, label in ((single, "single process"), (ref, "reference")):
                want = (expected[0], expected[1][q_lo:q_lo + len(q)],
                        expected[2][c_lo:c_lo + len(c)])
                _close(got, want, f"{where} vs {label}")

            # rank 0 moves its query 0; the copy of its positive (on rank 1) must not notice
            moved = q.clone()
            if rank == 0:
                moved[0] = F.normalize(q[0] + 0.5 * torch.ones(D, dtype=torch.float64), dim=-1)
            _, _, dc_moved = _gathered(rank, moved, c, keys, rw, tile, symmetric)
            _, _, dc_plain = _gathered(rank, q, c, None, rw, tile, symmetric)
            _, _, dc_plain_moved = _gathered(rank, moved, c, None, rw, tile, symmetric)
            if rank == 1:
                torch.testing.assert_close(dc_moved[copy], dc[copy], rtol=1e-12, atol=1e-15,
                                           msg=where)
                assert not torch.allclose(dc_plain_moved[copy], dc_plain[copy]), where
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_a_duplicate_on_another_rank_is_masked():
    run_workers(_worker, WORLD)

"""mmemb.loss: the full-matrix loss against float64 autograd, layout, validation, diagnostics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from loss_impls import impl

import mmemb.loss as L
from mmemb import plugins
from mmemb.errors import ConfigError

SHAPES = [  # (B, K hard negatives per query, D)
    (1, 0, 4),
    (1, 3, 4),
    (5, 0, 8),
    (6, 3, 16),
    (7, 1, 5),
]


def _batch(b: int, k: int, d: int, *, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    c = torch.cat([pos, neg.reshape(b * k, d)])
    return q.to(dtype), c.to(dtype), torch.arange(b)


def reference(q, c, t, tau, symmetric):
    """Direct float64 autograd: log_softmax + nll (and the transposed pairs when symmetric)."""
    z = q @ c.T / tau
    loss = F.nll_loss(F.log_softmax(z, dim=1), t)
    if symmetric:
        z_rev = z[:, t].T  # row i: positive c_{t_i} against every query
        loss = 0.5 * (loss + F.nll_loss(F.log_softmax(z_rev, dim=1), torch.arange(len(t))))
    return loss


def _grads(fn, q, c, tau=None):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = fn(q, c) if tau is None else fn(q, c, tau)
    loss.backward()
    return loss.detach(), q.grad, c.grad


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_full_matrix_matches_float64_autograd(shape, symmetric):
    b, k, d = shape
    q, c, t = _batch(b, k, d, seed=b * 31 + k)
    tau = 0.05
    ref = _grads(lambda q, c: reference(q, c, t, tau, symmetric), q, c)
    got = _grads(
        lambda q, c: L.contrastive_loss(q, c, t, temperature=tau, symmetric=symmetric), q, c
    )
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 accumulation, compared with the float64 reference
    got32 = _grads(
        lambda q, c: L.contrastive_loss(q, c, t, temperature=tau, symmetric=symmetric),
        q.float(), c.float(),
    )
    assert got32[0].dtype == torch.float32
    for r, g in zip(ref, got32, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_targets_need_not_be_the_diagonal():
    q, c, _ = _batch(4, 2, 6, seed=3)
    t = torch.tensor([5, 0, 11, 2])
    ref = _grads(lambda q, c: reference(q, c, t, 0.1, True), q, c)
    got = _grads(lambda q, c: L.contrastive_loss(q, c, t, temperature=0.1, symmetric=True), q, c)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tile", [None, 3])
def test_learnable_temperature_gets_its_gradient(tile):
    q, c, t = _batch(5, 2, 8, seed=7)
    tau0 = torch.tensor(0.07, dtype=torch.float64)

    def ref_fn(q, c, tau):
        return reference(q, c, t, tau, True)

    def got_fn(q, c, tau):
        return L.contrastive_loss(q, c, t, temperature=tau, impl=impl(tile), symmetric=True)

    grads = []
    for fn in (ref_fn, got_fn):
        tau = tau0.clone().requires_grad_()
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        fn(qq, cc, tau).backward()
        grads.append((tau.grad, qq.grad, cc.grad))
    for r, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_assemble_candidates_layout():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(3, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    c, t = L.assemble_candidates(pos, neg)
    assert c.shape == (9, 5) and t.tolist() == [0, 1, 2]
    torch.testing.assert_close(c[:3], pos)
    for i in range(3):
        for k in range(2):
            torch.testing.assert_close(c[3 + i * 2 + k], neg[i, k])
    c2, _ = L.assemble_candidates(pos, neg.reshape(6, 5))
    torch.testing.assert_close(c2, c)
    c3, t3 = L.assemble_candidates(pos)
    assert c3 is pos and t3.tolist() == [0, 1, 2]
    assert L.candidate_targets(4, 7).tolist() == [0, 1, 2, 3]


def test_assemble_candidates_keeps_gradients():
    pos = torch.randn(2, 3, requires_grad=True)
    neg = torch.randn(2, 1, 3, requires_grad=True)
    c, t = L.assemble_candidates(pos, neg)
    L.contrastive_loss(pos * 0 + 1, c, t, temperature=0.5).backward()
    assert pos.grad is not None and neg.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(c=torch.randn(4, 5)), "differ in width"),
        (dict(t=torch.tensor([0, 1, 9])), "[0, 4)"),
        (dict(t=torch.tensor([0, 1])), "(B,) tensor with B=3"),
        (dict(temperature=0.0), "positive finite"),
        (dict(temperature=-1.0), "positive finite"),
        (dict(keys=torch.arange(3)), "keys must be a (M,) int64"),
        (dict(keys=torch.zeros(4)), "keys must be a (M,) int64"),
        (dict(t=torch.tensor([0, 0, 1]), symmetric=True), "symmetric=True"),
        (dict(reweighter="ega"), "mmemb.plugins.build"),
        (dict(q=torch.randn(3)), "(B, D)"),
    ],
)
def test_user_errors_are_config_errors(kwargs, needle):
    args = dict(q=torch.randn(3, 4), c=torch.randn(4, 4), t=torch.arange(3), temperature=0.05)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        L.contrastive_loss(
            args.pop("q"), args.pop("c"), args.pop("t"), **args  # type: ignore[arg-type]
        )
    assert needle in str(info.value)


def test_assemble_candidates_rejects_mismatched_negatives():
    with pytest.raises(ConfigError, match="expected"):
        L.assemble_candidates(torch.randn(3, 4), torch.randn(2, 2, 4))
    with pytest.raises(ConfigError, match="query by query"):
        L.assemble_candidates(torch.randn(3, 4), torch.randn(5, 4))


def test_gathered_loss_without_process_group_is_contrastive_loss():
    q, c, t = _batch(4, 2, 6, seed=11)
    ega = plugins.build("reweighter", "ega", alpha=2.0)
    for tile in (None, 3):
        kw = dict(temperature=0.05, reweighter=ega, impl=impl(tile), symmetric=True)
        a = _grads(lambda q, c, kw=kw: L.gathered_contrastive_loss(q, c, t, **kw), q, c)
        b = _grads(lambda q, c, kw=kw: L.contrastive_loss(q, c, t, **kw), q, c)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_diagnostics_match_an_independent_computation():
    q, c, t = _batch(6, 3, 8, seed=5)
    tau, alpha = 0.05, 1.5
    plain = L.loss_diagnostics(q, c, t, temperature=tau)
    assert plain["amplification"] == pytest.approx(1.0)
    assert plain["loss"] == pytest.approx(float(reference(q, c, t, tau, False)), rel=1e-12)
    ega = plugins.build("reweighter", "ega", alpha=alpha, normalize=False)
    got = L.loss_diagnostics(q, c, t, temperature=tau, reweighter=ega, max_elements=20)
    s = q @ c.T
    p = torch.softmax(s / tau, dim=1)
    rows = torch.arange(6)
    neg = torch.ones_like(p, dtype=torch.bool)
    neg[rows, t] = False
    h = torch.clamp(torch.exp((s - s[rows, t][:, None]) / tau), max=1.0)
    pbar = p * (1 + alpha * h)
    mass = ((pbar * neg).sum(1) / (p * neg).sum(1)).mean()
    assert got["negative_mass"] == pytest.approx(float(mass), rel=1e-10)
    # the hardest ceil(10 %) of each row's 23 negatives (3), by similarity, one row at a time
    ratios, shares = [], []
    for i in range(6):
        negs = [j for j in range(24) if j != int(t[i])]
        hard = sorted(negs, key=lambda j: float(s[i, j]), reverse=True)[:3]
        share = float(p[i, hard].sum() / p[i, negs].sum())
        share_bar = float(pbar[i, hard].sum() / pbar[i, negs].sum())
        ratios.append(share_bar / share)
        shares.append(share_bar)
    assert got["amplification"] == pytest.approx(sum(ratios) / 6, rel=1e-10)
    assert got["hard_share"] == pytest.approx(sum(shares) / 6, rel=1e-10)
    assert plain["negative_mass"] == pytest.approx(1.0)
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    assert got["pos_sim"] == pytest.approx(float(s[rows, t].mean()), rel=1e-10)
    hardest = torch.where(neg, s, -torch.inf).amax(1).mean()
    assert got["hardest_neg_sim"] == pytest.approx(float(hardest), rel=1e-10)
    topk = plugins.build("reweighter", "topk_mask", k=2, delta=2.0)  # never drops
    assert L.loss_diagnostics(q, c, t, temperature=tau, reweighter=topk)[
        "removed_fraction"
    ] == pytest.approx((len(c) - 1 - 2) / (len(c) - 1))


def test_kernel_loss_module_imports_no_plugin():
    code = (
        "import sys, mmemb.loss; "
        "bad = [m for m in sys.modules if m.startswith('mmemb_')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

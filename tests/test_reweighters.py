"""Reweighter plugins (none, ega, llave, topk_mask) against float64 references of their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_impls import impl

import mmemb.loss as L
from mmemb import plugins
from mmemb.errors import ConfigError, UnknownComponentError

TAU = 0.05


def _batch(b: int, k: int, d: int, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(b + b * k, d, generator=g, dtype=torch.float64), dim=-1)
    return q, c, torch.arange(b)


def _run(q, c, t, *, reweighter, tile_size=None, symmetric=False, tau=TAU):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = L.contrastive_loss(
        q, c, t, temperature=tau, reweighter=reweighter, impl=impl(tile_size), symmetric=symmetric
    )
    loss.backward()
    return loss.detach(), q.grad, c.grad


def _close(got, ref, rtol=1e-10, atol=1e-12):
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------- registry


def test_registered_and_built_by_name():
    assert {"none", "ega", "llave", "topk_mask"} <= set(plugins.available("reweighter"))
    ega = plugins.build("reweighter", "ega", alpha=2.0)
    assert isinstance(ega, L.Reweighter) and ega.config.alpha == 2.0
    assert ega.config.tau_h is None and ega.config.hardness == "exp"
    assert isinstance(plugins.build("reweighter", "none"), L.PlainInfoNCE)
    assert plugins.build("reweighter", "llave").config.alpha == 9.0
    assert plugins.build("reweighter", "topk_mask", k=3).config.k == 3
    assert plugins.build_from("reweighter", {"name": "ega", "alpha": 0.5}, where="loss.reweighter")


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("ega", {"alpha": -1.0}, "alpha"),
        ("ega", {"tau_h": 0.0}, "tau_h"),
        ("ega", {"hardness": "cosine"}, "hardness"),
        ("ega", {"margin": 0.0}, "margin"),
        ("ega", {"beta": 1.0}, "unknown argument"),
        ("llave", {"alpha": -2.0}, "alpha"),
        ("topk_mask", {"k": 0}, "k"),
        ("topk_mask", {"delta": -0.1}, "delta"),
        ("none", {"alpha": 1.0}, "unknown argument"),
    ],
)
def test_bad_options_are_config_errors(name, kwargs, needle):
    with pytest.raises(ConfigError) as info:
        plugins.build("reweighter", name, **kwargs)
    assert needle in str(info.value)


def test_unknown_reweighter_suggests_the_closest():
    with pytest.raises(UnknownComponentError, match="Did you mean 'ega'"):
        plugins.build("reweighter", "EGA_")


# ----------------------------------------------------------------------------------------- EGA


def ega_reference(q, c, t, tau, *, alpha=1.0, tau_h=None, hardness="exp", margin=0.1,
                  normalize=True, fn_margin=None):
    """(loss, dq, dc): plain InfoNCE loss; gradient (p̄ − y)/B pushed through s = q·cᵀ/τ."""
    b, m = len(q), len(c)
    s = q @ c.T
    z = s / tau
    p = torch.softmax(z, dim=1)
    y = torch.zeros(b, m, dtype=q.dtype)
    y[torch.arange(b), t] = 1.0
    s_pos = s[torch.arange(b), t][:, None]
    diff = s - s_pos
    if hardness == "exp":
        h = torch.minimum(torch.ones_like(diff), torch.exp(diff / (tau_h or tau)))
    else:
        h = ((diff + margin) / margin).clamp(0.0, 1.0)
    if fn_margin is not None:
        h[diff > fn_margin] = 0.0
    pbar = p * (1.0 + alpha * h)
    neg = y == 0
    if normalize:
        scale = (p * neg).sum(1, keepdim=True) / (pbar * neg).sum(1, keepdim=True)
        pbar = pbar * scale
    pbar = torch.where(neg, pbar, p)
    g = (pbar - y) / b
    loss = -(torch.log_softmax(z, dim=1) * y).sum() / b
    return loss, g @ c / tau, g.T @ q / tau


EGA_OPTIONS = [  # the reference's defaults are EGAConfig's (normalize: true)
    {},
    {"normalize": False},
    {"alpha": 2.5, "normalize": False},
    {"tau_h": 0.2, "normalize": False},
    {"hardness": "linear", "margin": 0.3, "normalize": False},
    {"alpha": 2.5},
    {"fn_margin": 0.05, "normalize": False},
    {"alpha": 3.0, "tau_h": 0.1, "normalize": True, "fn_margin": 0.0},
    {"hardness": "linear", "margin": 0.5, "normalize": True, "fn_margin": 0.1},
]


def _ids(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", EGA_OPTIONS, ids=_ids)
@pytest.mark.parametrize("shape", [(6, 0, 8), (5, 3, 6), (1, 4, 3)])
def test_ega_gradient_is_pbar_minus_y(options, shape):
    q, c, t = _batch(*shape, seed=sum(shape))
    ega = plugins.build("reweighter", "ega", **options)
    ref = ega_reference(q, c, t, TAU, **options)
    _close(_run(q, c, t, reweighter=ega), ref)
    _close(_run(q, c, t, reweighter=ega, tile_size=2), ref)


def test_ega_options_actually_change_the_gradient():
    q, c, t = _batch(6, 2, 4, seed=1)
    base = ega_reference(q, c, t, TAU)
    plain = ega_reference(q, c, t, TAU, alpha=0.0)
    for opts in EGA_OPTIONS[1:]:
        other = ega_reference(q, c, t, TAU, **opts)
        assert not torch.allclose(other[1], base[1]), opts
    assert not torch.allclose(base[1], plain[1])
    # fn_margin=0.05 must zero some hardness in this batch, else the test proves nothing
    diff = q @ c.T - (q * c[t]).sum(1, keepdim=True)
    assert (diff > 0.05).sum() > 0


@pytest.mark.parametrize("options", [{}, {"normalize": True, "fn_margin": 0.0, "tau_h": 0.3}])
def test_ega_alpha_zero_is_plain_infonce(options):
    q, c, t = _batch(5, 2, 8, seed=2)
    plain = _run(q, c, t, reweighter=None, symmetric=True)
    ega0 = _run(q, c, t, reweighter=plugins.build("reweighter", "ega", alpha=0.0, **options),
                symmetric=True)
    for a, b in zip(ega0, plain, strict=True):
        assert torch.equal(a, b)
    tiled = _run(q, c, t, reweighter=plugins.build("reweighter", "ega", alpha=0.0, **options),
                 symmetric=True, tile_size=3)
    _close(tiled, plain)


def test_ega_keeps_the_loss_value():
    q, c, t = _batch(5, 2, 8, seed=3)
    plain, _, _ = _run(q, c, t, reweighter=None)
    for opts in EGA_OPTIONS:
        loss, _, _ = _run(q, c, t, reweighter=plugins.build("reweighter", "ega", **opts))
        assert torch.equal(loss, plain)


def test_ega_symmetric_amplifies_both_directions():
    q, c, t = _batch(4, 2, 6, seed=4)
    opts = {"alpha": 2.0}
    fwd = ega_reference(q, c, t, TAU, **opts)
    # reverse rows: positive c_{t_i} against every query, target i
    rev = ega_reference(c[t], q, torch.arange(4), TAU, **opts)
    dq = 0.5 * (fwd[1] + rev[2])
    dc = 0.5 * fwd[2]
    dc = dc.index_add(0, t, 0.5 * rev[1])
    ref = (0.5 * (fwd[0] + rev[0]), dq, dc)
    ega = plugins.build("reweighter", "ega", **opts)
    _close(_run(q, c, t, reweighter=ega, symmetric=True), ref)
    _close(_run(q, c, t, reweighter=ega, symmetric=True, tile_size=3), ref)


# --------------------------------------------------------------------------------------- LLaVE


def llave_reference(q, c, t, tau, alpha):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    s = q @ c.T
    neg = torch.ones_like(s, dtype=torch.bool)
    neg[torch.arange(len(q)), t] = False
    z = s / tau + alpha * s.detach() * neg
    loss = F.nll_loss(F.log_softmax(z, dim=1), t)
    loss.backward()
    return loss.detach(), q.grad, c.grad


@pytest.mark.parametrize("alpha", [0.0, 1.0, 9.0])
@pytest.mark.parametrize("shape", [(6, 0, 8), (5, 3, 6)])
def test_llave_matches_its_formula(alpha, shape):
    q, c, t = _batch(*shape, seed=11)
    llave = plugins.build("reweighter", "llave", alpha=alpha)
    ref = llave_reference(q, c, t, TAU, alpha)
    _close(_run(q, c, t, reweighter=llave), ref)
    _close(_run(q, c, t, reweighter=llave, tile_size=4), ref)
    if alpha > 0:
        plain = _run(q, c, t, reweighter=None)
        assert ref[0] > plain[0]  # the offset raises every negative's weight


# ------------------------------------------------------------------------------------ top-k mask


def topk_reference(q, c, t, tau, k, delta):
    """Row by row: drop negatives above s+ + δ, keep the k hardest of the rest, autograd."""
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    s = q @ c.T
    keep = torch.zeros_like(s, dtype=torch.bool)
    dropped = 0
    for i in range(len(q)):
        row = s[i].detach()
        pos = int(t[i])
        candidates = [j for j in range(len(c)) if j != pos and row[j] <= row[pos] + delta]
        dropped += len(c) - 1 - len(candidates)
        candidates.sort(key=lambda j: float(row[j]), reverse=True)
        for j in candidates[:k]:
            keep[i, j] = True
        keep[i, pos] = True
    z = (s / tau).masked_fill(~keep, float("-inf"))
    loss = F.nll_loss(F.log_softmax(z, dim=1), t)
    loss.backward()
    return (loss.detach(), q.grad, c.grad), dropped


@pytest.mark.parametrize(("k", "delta"), [(1, 0.0), (3, 0.05), (4, 0.3), (50, 0.1)])
@pytest.mark.parametrize("shape", [(6, 0, 3), (5, 3, 4), (3, 10, 3)])
def test_topk_mask_matches_its_formula(k, delta, shape):
    q, c, t = _batch(*shape, seed=13)
    topk = plugins.build("reweighter", "topk_mask", k=k, delta=delta)
    ref, _ = topk_reference(q, c, t, TAU, k, delta)
    _close(_run(q, c, t, reweighter=topk), ref)
    _close(_run(q, c, t, reweighter=topk, tile_size=2), ref)
    _close(_run(q, c, t, reweighter=topk, tile_size=5), ref)


def test_topk_mask_cases_are_meaningful():
    """The batches above do drop false negatives and do truncate to k."""
    q, c, t = _batch(3, 10, 3, seed=13)
    _, dropped = topk_reference(q, c, t, TAU, 3, 0.05)
    assert dropped > 0
    masked = _run(q, c, t, reweighter=plugins.build("reweighter", "topk_mask", k=3, delta=0.05))
    plain = _run(q, c, t, reweighter=None)
    assert masked[0] < plain[0]
    # negatives outside the kept set get exactly zero gradient
    assert int((masked[2].abs().sum(1) == 0).sum()) > 0


def test_duplicate_candidates_tie_at_the_threshold_and_are_all_kept():
    q, c, t = _batch(2, 3, 4, seed=5)
    c = torch.cat([c, c[2:3], c[2:3]])  # two exact copies of one negative
    topk = plugins.build("reweighter", "topk_mask", k=1, delta=2.0)
    full = _run(q, c, t, reweighter=topk)
    tiled = _run(q, c, t, reweighter=topk, tile_size=3)
    _close(tiled, full)

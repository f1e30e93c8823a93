"""The tiled loss (PyTorch tiles) equals the full-matrix loss, for every reweighter and shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_impls import impl
from torch.overrides import TorchFunctionMode

import mmemb.loss as L
from mmemb import plugins
from mmemb.errors import ConfigError

REWEIGHTERS = [
    ("none", {}),
    ("ega", {}),
    ("ega", {"alpha": 2.0, "hardness": "linear", "margin": 0.3, "normalize": True,
             "fn_margin": 0.05}),
    ("ega", {"tau_h": 0.1, "normalize": True}),
    ("llave", {"alpha": 9.0}),
    ("topk_mask", {"k": 3, "delta": 0.05}),
]
SHAPES = [  # (B, M, tile)
    (1, 1, 1),
    (1, 7, 3),
    (5, 5, 2),
    (8, 24, 5),
    (6, 18, 6),
    (4, 96, 8),
    (6, 30, 64),
]
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}
"""rtol; entries near zero are compared to the tensor's scale: atol = rtol·max(1, max |ref|)."""


def _batch(b: int, m: int, d: int, *, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    return q.to(dtype), c.to(dtype), torch.arange(b)


def _run(q, c, t, **kwargs):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = L.contrastive_loss(q, c, t, **kwargs)
    loss.backward()
    return loss.detach(), q.grad, c.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("name", "options"), REWEIGHTERS,
                         ids=[f"{n}{i}" for i, (n, _) in enumerate(REWEIGHTERS)])
def test_tiled_equals_full(name, options, dtype):
    rw = plugins.build("reweighter", name, **options)
    rtol = TOLERANCES[dtype]
    for b, m, tile in SHAPES:
        for symmetric in (False, True):
            if symmetric and m < b:
                continue
            q, c, t = _batch(b, m, 6, seed=b * 100 + m, dtype=dtype)
            kw = dict(temperature=0.05, reweighter=rw, symmetric=symmetric)
            full = _run(q, c, t, impl=impl(None), **kw)
            tiled = _run(q, c, t, impl=impl(tile), **kw)
            for f, g in zip(full, tiled, strict=True):
                assert f.dtype == g.dtype
                atol = rtol * max(float(f.abs().max()), 1.0)
                torch.testing.assert_close(
                    g, f, rtol=rtol, atol=atol, msg=lambda s, b=b, m=m, tile=tile,
                    symmetric=symmetric: f"B={b} M={m} tile={tile} sym={symmetric}: {s}",
                )


def test_targets_anywhere_and_shared_positives():
    """Targets need not be the diagonal; two queries may share a positive (non-symmetric)."""
    q, c, _ = _batch(6, 20, 5, seed=9, dtype=torch.float64)
    t = torch.tensor([19, 3, 3, 0, 12, 7])
    for name, options in REWEIGHTERS:
        rw = plugins.build("reweighter", name, **options)
        full = _run(q, c, t, temperature=0.05, reweighter=rw)
        tiled = _run(q, c, t, temperature=0.05, reweighter=rw, impl=impl(4))
        for f, g in zip(full, tiled, strict=True):
            torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


def test_half_precision_inputs_accumulate_in_float32():
    q, c, t = _batch(5, 15, 8, seed=1, dtype=torch.float64)
    ref = _run(q, c, t, temperature=0.05)
    for dtype in (torch.bfloat16, torch.float16):
        got = _run(q.to(dtype), c.to(dtype), t, temperature=0.05, impl=impl(4))
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize(("name", "options"), REWEIGHTERS[1:],
                         ids=[n for n, _ in REWEIGHTERS[1:]])
def test_tiled_never_builds_the_full_matrix(name, options):
    b = m = 160
    d, tile = 4, 40
    q, c, t = _batch(b, m, d, seed=0, dtype=torch.float32)
    rw = plugins.build("reweighter", name, **options)
    for tile_size, bound in ((None, b * m), (tile, 2 * tile * tile)):
        spy = _LargestTensor()
        with spy:
            _run(q, c, t, temperature=0.05, reweighter=rw, impl=impl(tile_size), symmetric=True)
        if tile_size is None:
            assert spy.largest >= bound  # the spy does see the full matrix when there is one
        else:
            assert spy.largest <= max(bound, (b + m) * d), spy.largest


def test_tiled_loss_component_and_forced_backends():
    tiled = plugins.build("loss", "tiled", tile_size=3)
    q, c, t = _batch(4, 9, 5, seed=2, dtype=torch.float64)
    ega = plugins.build("reweighter", "ega")
    a = tiled(q, c, t, temperature=0.05, reweighter=ega)
    b = plugins.build("loss", "tiled", tile_size=3, implementation="torch")(
        q, c, t, temperature=0.05, reweighter=ega
    )
    assert torch.equal(a, b)
    assert tiled.backend_for(q, ega).name == "torch"  # CPU tensors: PyTorch tiles
    with pytest.raises(ConfigError, match="implementation"):
        plugins.build("loss", "tiled", implementation="cuda")


def test_forcing_triton_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiled = plugins.build("loss", "tiled", tile_size=3, implementation="triton")
    q, c, t = _batch(4, 9, 5, seed=2, dtype=torch.float64)
    with pytest.raises(ConfigError) as info:
        tiled(q, c, t, temperature=0.05, reweighter=L.PlainInfoNCE())
    assert "implementation=" in str(info.value)


def test_third_party_reweighter_runs_on_the_torch_tiles():
    class Halve(L.Reweighter):
        transforms_probs = True

        def transform_probs(self, p, z, z_pos, is_pos, *, temperature, stats):
            return torch.where(is_pos, p, 0.5 * p)

    q, c, t = _batch(5, 12, 4, seed=4, dtype=torch.float64)
    full = _run(q, c, t, temperature=0.1, reweighter=Halve())
    tiled = _run(q, c, t, temperature=0.1, reweighter=Halve(), impl=impl(5))
    for f, g in zip(full, tiled, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)
    # independent check of the gradient: (p̄ − y)/B through s = q cᵀ / τ
    p = torch.softmax(q @ c.T / 0.1, dim=1)
    y = torch.zeros_like(p)
    y[torch.arange(5), t] = 1
    g = (torch.where(y.bool(), p, 0.5 * p) - y) / 5
    torch.testing.assert_close(full[1], g @ c / 0.1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tau"), [(torch.float32, 0.01), (torch.float64, 0.001)])
def test_negatives_far_above_the_positive_do_not_overflow(dtype, tau):
    """The tiles shift rows by the positive logit; a negative ≫ positive takes the exact path."""
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=-1)
    t = torch.arange(6)
    c[0] = -q[0]  # query 0's positive is its exact opposite ...
    c[7] = q[0]  # ... and one negative is the query itself: 2/τ logits above the positive
    rtol = TOLERANCES[dtype]
    for name, options in REWEIGHTERS:
        rw = plugins.build("reweighter", name, **options)
        full = _run(q.to(dtype), c.to(dtype), t, temperature=tau, reweighter=rw)
        tiled = _run(q.to(dtype), c.to(dtype), t, temperature=tau, reweighter=rw, impl=impl(4))
        assert all(torch.isfinite(x).all() for x in tiled), name
        for f, x in zip(full, tiled, strict=True):
            torch.testing.assert_close(x, f, rtol=rtol, atol=rtol * max(float(f.abs().max()), 1.0))

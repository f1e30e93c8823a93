"""Contract checks a plugin author runs in their own tests (also used by mmemb's).

    from mmemb.testing.contracts import check_reweighter

    def test_my_reweighter():
        check_reweighter(MyReweighter(MyConfig(alpha=1.0)), neutral=MyReweighter(MyConfig(alpha=0)))

Each check raises ``AssertionError`` naming what broke. They need no plugin by name: the loss
implementations compared are every registered ``loss`` component.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmemb import plugins
from mmemb.loss import DirectionalLoss, PlainInfoNCE, Reweighter, contrastive_loss

__all__ = ["check_reweighter", "loss_implementations"]


def loss_implementations(tile_sizes: Sequence[int] = (1, 3, 7, 64)) -> dict[str, DirectionalLoss]:
    """Every registered loss component, built once per tile size when it takes one."""
    out: dict[str, DirectionalLoss] = {}
    for name in plugins.available("loss"):
        config = plugins.get("loss", name).config
        if config is not None and "tile_size" in config.model_fields:
            for tile in tile_sizes:
                out[f"{name}(tile_size={tile})"] = plugins.build("loss", name, tile_size=tile)
        else:
            out[name] = plugins.build("loss", name)
    return out


def _batch(b: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    # a few near-duplicates of the positives, so that "hard" negatives exist
    n = max(0, min(b, m - b))
    c[b : b + n] = F.normalize(c[:n] + 0.3 * c[b : b + n], dim=-1)
    return q, c, torch.arange(b)


def _run(
    q: torch.Tensor, c: torch.Tensor, t: torch.Tensor, rw: Reweighter,
    impl: DirectionalLoss | None, *, symmetric: bool, keys: torch.Tensor | None, tau: float,
) -> tuple[torch.Tensor, ...]:
    qq = q.detach().clone().requires_grad_()
    cc = c.detach().clone().requires_grad_()
    loss = contrastive_loss(qq, cc, t, temperature=tau, reweighter=rw, symmetric=symmetric,
                            keys=keys, impl=impl)
    loss.backward()
    assert qq.grad is not None and cc.grad is not None
    return loss.detach(), qq.grad, cc.grad


def check_reweighter(
    reweighter: Reweighter,
    *,
    neutral: Reweighter | None = None,
    temperature: float = 0.05,
    shapes: Sequence[tuple[int, int]] = ((1, 1), (5, 5), (6, 17), (8, 40)),
    rtol: float = 1e-9,
) -> None:
    """Check a reweighter against mmemb's contract, in float64.

    - every registered loss implementation (each tiled one at several tile sizes) gives the same
      loss and gradients as the full matrix, with and without duplicate-positive keys, in both
      directions of a symmetric loss — so the transforms really are elementwise given the row
      statistics and do not depend on how the matrix is tiled;
    - the loss and the gradients are finite, and the reweighter keeps no state between calls
      (a second call gives bit-identical results);
    - ``transform_logits`` is the identity plus a constant: a reweighter that changes only the
      backward (``transforms_probs`` alone) leaves the loss value equal to plain InfoNCE's;
    - ``neutral``, the same reweighter at its no-op setting (e.g. ``alpha=0``), equals plain
      InfoNCE exactly on the full matrix (the α → 0 limit).
    """
    assert isinstance(reweighter, Reweighter), f"{reweighter!r} is not a mmemb.loss.Reweighter"
    impls = loss_implementations()
    plain = PlainInfoNCE()
    for b, m in shapes:
        q, c, t = _batch(b, m, 6, seed=b * 1000 + m)
        keys = torch.arange(m, dtype=torch.long)
        if m > b + 1:
            keys[b] = keys[0]  # a copy of query 0's positive sits among the negatives
        for symmetric in (False, True) if m >= b else (False,):
            for k in (None, keys):
                ref = _run(q, c, t, reweighter, None, symmetric=symmetric, keys=k, tau=temperature)
                where = f"B={b} M={m} symmetric={symmetric} keys={k is not None}"
                for value in ref:
                    assert torch.isfinite(value).all(), f"{reweighter!r}: non-finite at {where}"
                again = _run(q, c, t, reweighter, None, symmetric=symmetric, keys=k,
                             tau=temperature)
                for a, r in zip(again, ref, strict=True):
                    assert torch.equal(a, r), f"{reweighter!r} keeps state between calls ({where})"
                if reweighter.transforms_probs and not reweighter.transforms_logits:
                    base = _run(q, c, t, plain, None, symmetric=symmetric, keys=k, tau=temperature)
                    torch.testing.assert_close(
                        ref[0], base[0], rtol=rtol, atol=0.0,
                        msg=f"{reweighter!r} changes only the backward but the loss value moved "
                        f"({where})",
                    )
                for name, impl in impls.items():
                    got = _run(q, c, t, reweighter, impl, symmetric=symmetric, keys=k,
                               tau=temperature)
                    for label, g, r in zip(("loss", "dq", "dc"), got, ref, strict=True):
                        scale = max(float(r.abs().max()), 1.0)
                        torch.testing.assert_close(
                            g, r, rtol=rtol, atol=rtol * scale,
                            msg=lambda s, name=name, label=label, where=where:
                            f"{reweighter!r}: {name} differs from the full matrix in {label} "
                            f"at {where}: {s}",
                        )
        if neutral is not None:
            a = _run(q, c, t, neutral, None, symmetric=False, keys=None, tau=temperature)
            p = _run(q, c, t, plain, None, symmetric=False, keys=None, tau=temperature)
            for label, x, y in zip(("loss", "dq", "dc"), a, p, strict=True):
                torch.testing.assert_close(
                    x, y, rtol=rtol, atol=1e-12,
                    msg=f"{neutral!r} (the no-op setting) is not plain InfoNCE in {label}",
                )

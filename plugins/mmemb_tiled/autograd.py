"""The autograd function of the tiled loss (`TiledCE`) and the backends its two passes run on
(PyTorch tiles, the Triton kernel)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Protocol

import torch

from mmemb.loss import DuplicateKeys, Reweighter, RowStats
from mmemb_tiled import torch_tiles


class TileBackend(Protocol):
    """One implementation of the tiled algorithm's two passes."""

    name: str

    def forward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        tau: float, rw: Reweighter, tile: int, keys: DuplicateKeys | None,
    ) -> tuple[torch.Tensor, RowStats, torch.Tensor]:
        """(lse (B,), row statistics, reweighted positive logits (B,))."""
        ...

    def backward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        lse: torch.Tensor, stats: RowStats, scale: torch.Tensor, tau: float, rw: Reweighter,
        tile: int, keys: DuplicateKeys | None, *, need_dq: bool, need_dc: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dq, dc) in the accumulation dtype, None where not needed."""
        ...


class TorchTiles:
    """PyTorch tiles: every device, every reweighter, float32/float64 accumulation."""

    name = "torch"

    def forward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        tau: float, rw: Reweighter, tile: int, keys: DuplicateKeys | None,
    ) -> tuple[torch.Tensor, RowStats, torch.Tensor]:
        lse, stats = torch_tiles.forward(q, c, targets, z_pos, tau, rw, tile, keys)
        zt_pos = z_pos
        if rw.transforms_logits:
            zp = z_pos[:, None]
            ones = torch.ones_like(zp, dtype=torch.bool)
            zt_pos = rw.transform_logits(zp, zp, ones, temperature=tau, stats=stats)[:, 0]
        return lse, stats, zt_pos

    def backward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        lse: torch.Tensor, stats: RowStats, scale: torch.Tensor, tau: float, rw: Reweighter,
        tile: int, keys: DuplicateKeys | None, *, need_dq: bool, need_dc: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return torch_tiles.backward(
            q, c, targets, z_pos, lse, stats, scale, tau, rw, tile, keys,
            need_dq=need_dq, need_dc=need_dc,
        )


class TritonTiles:
    """The fused Triton kernels, for reweighters with a `FusedForm` (positives never change).

    Duplicate positives are masked inside the kernels: the row and column keys travel as int64
    and are compared per tile (see :mod:`mmemb_tiled.triton_kernel`)."""

    name = "triton"

    def __init__(self, blocks: Any = None) -> None:
        from mmemb_tiled import triton_kernel

        self._k = triton_kernel
        self.blocks = blocks or triton_kernel.Blocks()

    def forward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        tau: float, rw: Reweighter, tile: int, keys: DuplicateKeys | None,
    ) -> tuple[torch.Tensor, RowStats, torch.Tensor]:
        form = rw.fused_form()
        assert form is not None
        lse, stats = self._k.forward(q, c, targets, z_pos, tau, form, self.blocks, _pair(keys))
        return lse, stats, z_pos

    def backward(
        self, q: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, z_pos: torch.Tensor,
        lse: torch.Tensor, stats: RowStats, scale: torch.Tensor, tau: float, rw: Reweighter,
        tile: int, keys: DuplicateKeys | None, *, need_dq: bool, need_dc: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        form = rw.fused_form()
        assert form is not None
        return self._k.backward(
            q, c, targets, z_pos, lse, stats, scale, tau, form, self.blocks, _pair(keys),
            need_dq=need_dq, need_dc=need_dc,
        )


def _pair(keys: DuplicateKeys | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernels' view of the keys: (each row's positive key, each column's key)."""
    return None if keys is None else (keys.rows, keys.cols)


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TiledCE(torch.autograd.Function):
    """``mean_i [lse_i − z'_i+]`` over tiles; backward recomputes the tiles (see torch_tiles)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        tau_t: torch.Tensor,
        rw: Reweighter,
        tile: int,
        backend: TileBackend,
        keys: DuplicateKeys | None,
    ) -> torch.Tensor:
        tau = float(tau_t)
        z_pos = torch_tiles.positive_logits(q.detach(), c.detach(), targets, tau)
        lse, stats, zt_pos = backend.forward(q, c, targets, z_pos, tau, rw, tile, keys)
        loss = (lse - zt_pos.to(lse.dtype)).mean()
        ctx.tau, ctx.rw, ctx.tile, ctx.backend = tau, rw, tile, backend
        ctx.dup_keys, ctx.stat_names = keys, list(stats)
        ctx.save_for_backward(q, c, targets, tau_t, z_pos, lse, *stats.values())
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, c, targets, tau_t, z_pos, lse, *values = ctx.saved_tensors
        stats = dict(zip(ctx.stat_names, values, strict=True))
        need_q, need_c, _, need_tau = ctx.needs_input_grad[:4]
        scale = grad_out.detach() / q.shape[0]
        dq, dc = ctx.backend.backward(
            q, c, targets, z_pos, lse, stats, scale, ctx.tau, ctx.rw, ctx.tile, ctx.dup_keys,
            need_dq=bool(need_q or need_tau), need_dc=bool(need_c),
        )
        dtau = None
        if need_tau:
            assert dq is not None
            # z = s/τ  ⇒  ∂L/∂τ = −Σ G∘z / τ = −Σ_i q_i·dq_i / τ
            dtau = (-(q.detach().to(dq.dtype) * dq).sum() / ctx.tau).to(tau_t.dtype)
            dtau = dtau.reshape(tau_t.shape)
        return (
            dq.to(q.dtype) if need_q and dq is not None else None,
            dc.to(c.dtype) if need_c and dc is not None else None,
            None,
            dtau,
            None,
            None,
            None,
            None,
        )

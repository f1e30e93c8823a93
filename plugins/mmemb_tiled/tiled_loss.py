"""The ``tiled`` loss component: picks a backend and applies the tiled autograd function."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb.errors import ConfigError
from mmemb.loss import DuplicateKeys, Reweighter
from mmemb_tiled.autograd import (
    TileBackend,
    TiledCE,
    TorchTiles,
    TritonTiles,
    triton_installed,
    triton_interpreting,
)

log = logging.getLogger(__name__)


class TiledLossConfig(BaseModel):
    """Options of the ``tiled`` loss: ``loss: {name: tiled, tile_size: …, implementation: …}``."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = Field(
        default=1024, gt=0,
        description="rows and columns of one PyTorch tile (the Triton kernel uses its own blocks); "
        "memory O(tile_size²) logits; 1024–2048 are good on CPU",
    )
    implementation: Literal["auto", "torch", "triton"] = Field(
        default="auto",
        description="auto: the Triton kernel for CUDA tensors when triton is installed and the "
        "reweighter has a fused form, PyTorch tiles otherwise; torch/triton force one",
    )


class TiledContrastiveLoss:
    """One direction of the contrastive loss without materialising the B×M logits.

    Expects ``q`` (B, D), ``c`` (M, D), ``targets`` (B,), a temperature, a
    :class:`mmemb.loss.Reweighter` and optionally duplicate-positive ``keys``; returns
    ``mean_i [logsumexp_j z'_ij − z'_i+]`` with the reweighter's gradients, equal to the
    full-matrix computation (loss ``full``) to floating-point tolerance, in
    O((B+M)·D + tile²) memory. Registered as loss ``tiled``: a recipe selects it with
    ``loss: {name: tiled, tile_size: 1024}``.

    Reference: the tiling follows Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite
    Batch Size Scaling for Contrastive Loss" (Inf-CL), extended with the reweighter transforms.

    Example::

        >>> tiled = mmemb.plugins.build("loss", "tiled", tile_size=1024)
        >>> loss = mmemb.loss.contrastive_loss(q, c, t, temperature=0.02, impl=tiled)
    """

    name = "tiled"

    def __init__(self, config: TiledLossConfig | None = None) -> None:
        self.config = config or TiledLossConfig()
        self.tile_size = self.config.tile_size
        self._torch = TorchTiles()
        self._triton: TritonTiles | None = None
        self._told: set[str] = set()

    def __repr__(self) -> str:
        return (f"TiledContrastiveLoss(tile_size={self.tile_size}, "
                f"implementation={self.config.implementation!r})")

    def backend_for(self, q: torch.Tensor, reweighter: Reweighter) -> TileBackend:
        """The backend this call runs on. Duplicate-positive keys do not change it: both backends
        mask them."""
        impl = self.config.implementation
        if impl == "torch":
            return self._torch
        if impl == "auto" and not (q.is_cuda and triton_installed()):
            return self._torch
        from mmemb_tiled.triton_kernel import supports

        form = reweighter.fused_form()
        ok = supports(form, q.dtype)  # duplicate-positive keys are masked inside the kernel
        if impl == "auto":
            if not ok:
                self._tell_fallback(reweighter, q.dtype)
                return self._torch
            return self._triton_backend()
        problems = []
        if not triton_installed():
            problems.append("loss.implementation=triton: triton is not installed "
                            "(pip install 'mmemb[triton]'), or use implementation=auto.")
        elif not ok:
            problems.append(
                f"loss.implementation=triton: the Triton kernel does not implement {reweighter!r} "
                f"with {q.dtype} inputs; use implementation=auto (falls back to PyTorch tiles)."
            )
        elif not (q.is_cuda or triton_interpreting()):
            problems.append("loss.implementation=triton: inputs are on the CPU; the kernel needs "
                            "CUDA tensors (or TRITON_INTERPRET=1 for testing).")
        if problems:
            raise ConfigError(problems)
        return self._triton_backend()

    def _tell_fallback(self, reweighter: Reweighter, dtype: torch.dtype) -> None:
        # Once per reason: a silent fallback from the fused kernel costs real speed on a GPU.
        if reweighter.fused_form() is None:
            reason = f"{reweighter!r} has no fused form (Reweighter.fused_form)"
        else:
            reason = f"the kernel does not support {reweighter!r} with {dtype} inputs"
        if reason not in self._told:
            self._told.add(reason)
            log.warning("tiled loss: using PyTorch tiles instead of the Triton kernel: %s", reason)

    def _triton_backend(self) -> TritonTiles:
        if self._triton is None:
            self._triton = TritonTiles()
        return self._triton

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter,
        keys: DuplicateKeys | None = None,
        backend: TileBackend | None = None,
    ) -> torch.Tensor:
        backend = backend or self.backend_for(q, reweighter)
        if isinstance(temperature, torch.Tensor):
            tau_t = temperature.reshape(())
        else:
            tau_t = torch.tensor(float(temperature), dtype=torch.float64)
        return TiledCE.apply(
            q, c, targets.long(), tau_t, reweighter, int(self.tile_size), backend, keys
        )

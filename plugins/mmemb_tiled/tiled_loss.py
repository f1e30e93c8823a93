"""The ``tiled`` loss component: picks an engine and applies the tiled autograd function."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb.errors import ConfigError
from mmemb.loss import Reweighter
from mmemb_tiled.function import (
    Engine,
    TiledCE,
    TorchEngine,
    TritonEngine,
    triton_installed,
    triton_interpreting,
)


class TiledLossConfig(BaseModel):
    """Options of the ``tiled`` loss."""

    model_config = ConfigDict(extra="forbid")

    implementation: Literal["auto", "torch", "triton"] = Field(
        default="auto",
        description="auto: the Triton kernel for CUDA tensors when triton is installed and the "
        "reweighter has a fused form, PyTorch tiles otherwise; torch/triton force one",
    )


class TiledContrastiveLoss:
    """One direction of the contrastive loss without materialising the B×M logits.

    Expects ``q`` (B, D), ``c`` (M, D), ``targets`` (B,), a temperature and a
    :class:`mmemb.loss.Reweighter`; returns ``mean_i [logsumexp_j z'_ij − z'_i+]`` with the
    reweighter's gradients, equal to the full-matrix computation to floating-point tolerance,
    in O((B+M)·D + tile²) memory. ``tile_size`` is the PyTorch tile (rows and columns); the Triton
    kernel uses its own block sizes. Reached through ``mmemb.loss.contrastive_loss(...,
    tile_size=T)`` or ``mmemb.plugins.build("loss", "tiled")``.

    Reference: the tiling follows Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite
    Batch Size Scaling for Contrastive Loss" (Inf-CL), extended with the reweighter transforms.

    Example::

        >>> tiled = mmemb.plugins.build("loss", "tiled")
        >>> loss = tiled(q, c, t, temperature=0.02, reweighter=ega, tile_size=1024)
    """

    def __init__(self, config: TiledLossConfig | None = None) -> None:
        self.config = config or TiledLossConfig()
        self._torch = TorchEngine()
        self._triton: TritonEngine | None = None

    def engine_for(self, q: torch.Tensor, reweighter: Reweighter) -> Engine:
        """The engine this call runs on."""
        impl = self.config.implementation
        if impl == "torch":
            return self._torch
        if impl == "auto" and not (q.is_cuda and triton_installed()):
            return self._torch
        from mmemb_tiled.triton_kernel import supports

        ok = supports(reweighter.fused_form(), q.dtype)
        if impl == "auto":
            return self._triton_engine() if ok else self._torch
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
        return self._triton_engine()

    def _triton_engine(self) -> TritonEngine:
        if self._triton is None:
            self._triton = TritonEngine()
        return self._triton

    def __call__(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor,
        reweighter: Reweighter,
        tile_size: int,
        engine: Engine | None = None,
    ) -> torch.Tensor:
        engine = engine or self.engine_for(q, reweighter)
        if isinstance(temperature, torch.Tensor):
            tau_t = temperature.reshape(())
        else:
            tau_t = torch.tensor(float(temperature), dtype=torch.float64)
        return TiledCE.apply(q, c, targets.long(), tau_t, reweighter, int(tile_size), engine)

"""mmemb-hello: a third-party plugin registering the `hello_max` pooler and the `hello_margin`
reweighter (docs/plugins.md walks through writing it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

import mmemb
from mmemb.loss import Reweighter
from mmemb.model import Pooler
from mmemb.plugins import Registrar

MMEMB_PLUGIN_API = 1  # the plugin API this package was written for; mmemb refuses a mismatch


class MaxPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaxPooler(Pooler):
    """Element-wise maximum over the real tokens (padding never wins)."""

    def __init__(self, config: MaxPoolConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        masked = hidden_states.masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf"))
        return masked.max(dim=1).values


class MarginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(1.0, ge=0.0, description="extra weight at the margin; 0 is plain InfoNCE")
    margin: float = Field(0.1, gt=0.0, description="width of the band below the positive")


class MarginReweighter(Reweighter):
    """Weight a negative's gradient by ``1 + β·σ((s_ij − s_i+ + m)/m·4)``: negatives within a margin
    ``m`` of their row's positive get up to ``1 + β`` times their plain-InfoNCE gradient.

    Elementwise given ``z``, ``z_pos`` and the temperature, so it runs unchanged on the full
    matrix and inside every tile of the tiled loss. It has no ``FusedForm``, so on CUDA the tiled
    loss runs it on PyTorch tiles (and logs one line saying so).
    """

    name = "hello_margin"
    transforms_probs = True  # changes only the backward: the loss value stays InfoNCE's

    def __init__(self, config: MarginConfig) -> None:
        self.config = config

    def transform_probs(
        self, p: torch.Tensor, z: torch.Tensor, z_pos: torch.Tensor, is_pos: torch.Tensor, *,
        temperature: float, stats: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        gap = (z - z_pos) * temperature + self.config.margin  # s_ij − s_i+ + m
        weight = 1.0 + self.config.beta * torch.sigmoid(4.0 * gap / self.config.margin)
        return torch.where(is_pos, p, p * weight)


@mmemb.hookimpl
def mmemb_register_poolers(registry: Registrar) -> None:
    registry.add("hello_max", MaxPooler, config=MaxPoolConfig, summary="mask-aware max pooling")


@mmemb.hookimpl
def mmemb_register_reweighters(registry: Registrar) -> None:
    registry.add("hello_margin", MarginReweighter, config=MarginConfig,
                 summary="more gradient for negatives within a margin of the positive")

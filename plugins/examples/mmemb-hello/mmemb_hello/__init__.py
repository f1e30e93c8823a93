"""mmemb-hello: a third-party plugin registering the `hello_max` pooler."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

import mmemb
from mmemb.model import Pooler
from mmemb.plugins import Registrar


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


@mmemb.hookimpl
def mmemb_register_poolers(registry: Registrar) -> None:
    registry.add("hello_max", MaxPooler, config=MaxPoolConfig, summary="mask-aware max pooling")

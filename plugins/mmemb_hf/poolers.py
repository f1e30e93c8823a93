"""Poolers: hidden states (N, L, H) + attention mask (N, L) -> one vector per item (N, H).

All of them read positions from the attention mask, never from the padding side: a row may be
padded on the left (decoders), on the right (BERT) or not at all, and the result is the same.
Hidden states at padded positions are never used -- not even multiplied by zero, because a fully
masked attention row can leave NaN there.
"""

from __future__ import annotations

import torch

from mmemb.errors import ConfigError
from mmemb.model import Backbone, Pooler


def _check(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"pooler: expected hidden states (N, L, H) and a mask (N, L); got "
            f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("pooler: a row of the attention mask has no token (empty item)")
    return mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left, right or no padding."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values


def first_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first real token, for left, right or no padding."""
    mask = attention_mask.bool()
    big = mask.shape[1]
    positions = torch.arange(big, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, big)).min(dim=1).values


def _gather(hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, index]


class LastTokenPooler(Pooler):
    """The hidden state of each row's last real token (the usual pooling for decoder LLMs, whose
    last position has attended to the whole prompt)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check(hidden_states, attention_mask)
        return _gather(hidden_states, last_token_index(attention_mask))


class EosPooler(Pooler):
    """The hidden state of the EOS token that ends each row.

    Needs a backbone that appends the tokenizer's EOS token (``append_eos: true``): the EOS is then
    each row's last real token, which is where this pooler reads -- the E5-Mistral / Tevatron
    ``eos`` convention. Building an encoder with a backbone that says it appends none is an error
    (the pooler would silently read the last prompt token, i.e. be `last_token`).
    """

    def check_backbone(self, backbone: Backbone) -> None:
        if backbone.appends_eos is False:
            raise ConfigError([
                "model.pooler: 'eos' reads the EOS token appended to every row, but the backbone "
                "appends none (model.backbone.append_eos is false, or its tokenizer has no EOS "
                "token). Set model.backbone.append_eos=true, or use the 'last_token' pooler."
            ])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check(hidden_states, attention_mask)
        return _gather(hidden_states, last_token_index(attention_mask))


class MeanPooler(Pooler):
    """The mean over each row's real tokens (padding excluded), accumulated in float32."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = _check(hidden_states, attention_mask)
        h = hidden_states.float().masked_fill(~mask.unsqueeze(-1), 0.0)
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).float()
        return (h.sum(dim=1) / counts).to(hidden_states.dtype)


class MaxPooler(Pooler):
    """The elementwise maximum over each row's real tokens (sentence-transformers' ``max``)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = _check(hidden_states, attention_mask)
        h = hidden_states.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return h.max(dim=1).values


class ClsPooler(Pooler):
    """The hidden state of each row's first real token ([CLS] for BERT-style encoders)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check(hidden_states, attention_mask)
        return _gather(hidden_states, first_token_index(attention_mask))


POOLERS: dict[str, tuple[type[Pooler], str]] = {
    "last_token": (LastTokenPooler, "hidden state of the last real token (left or right padding)"),
    "eos": (EosPooler, "hidden state of the appended EOS token (use with append_eos: true)"),
    "mean": (MeanPooler, "mean over real tokens (mask-aware)"),
    "max": (MaxPooler, "elementwise maximum over real tokens (mask-aware)"),
    "cls": (ClsPooler, "hidden state of the first real token ([CLS])"),
}

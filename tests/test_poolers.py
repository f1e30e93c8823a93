"""Poolers: correct positions under left, right and no padding; padding never leaks in."""

from __future__ import annotations

import pytest
import torch
from mmemb_hf.poolers import (
    ClsPooler,
    EosPooler,
    LastTokenPooler,
    MeanPooler,
    first_token_index,
    last_token_index,
)

from mmemb import plugins
from mmemb.errors import ConfigError

LENGTHS = [5, 2, 7, 1]


pytestmark = pytest.mark.only_plugins("mmemb_hf")

H = 6


def _items(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, generator=g) for n in LENGTHS]


def _pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with NaN, so any read of a padded position shows up in the result."""
    width = max(r.shape[0] for r in rows) + 1  # +1: even the longest row has padding
    hidden = torch.full((len(rows), width, H), float("nan"))
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        hidden[i, sl] = r
        mask[i, sl] = 1
    return hidden, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_reads_each_rows_last_real_token(side: str) -> None:
    rows = _items()
    hidden, mask = _pad(rows, side)
    out = LastTokenPooler()(hidden, mask)
    expected = torch.stack([r[-1] for r in rows])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_last_token_same_for_left_right_and_unpadded() -> None:
    rows = _items(1)
    left = LastTokenPooler()(*_pad(rows, "left"))
    right = LastTokenPooler()(*_pad(rows, "right"))
    single = torch.cat([LastTokenPooler()(r[None], torch.ones(1, len(r))) for r in rows])
    torch.testing.assert_close(left, right, rtol=0, atol=0)
    torch.testing.assert_close(left, single, rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cls_reads_each_rows_first_real_token(side: str) -> None:
    rows = _items(2)
    out = ClsPooler()(*_pad(rows, side))
    torch.testing.assert_close(out, torch.stack([r[0] for r in rows]), rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_excludes_padding(side: str) -> None:
    rows = _items(3)
    out = MeanPooler()(*_pad(rows, side))
    expected = torch.stack([r.mean(dim=0) for r in rows])
    assert torch.isfinite(out).all()  # NaN at padded positions must not leak in
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_mean_in_bfloat16_accumulates_in_float32() -> None:
    rows = [torch.full((300, H), 1.0) + 0.001 * torch.arange(300)[:, None]]
    hidden, mask = _pad(rows, "right")
    out = MeanPooler()(hidden.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    expected = rows[0].bfloat16().float().mean(dim=0, keepdim=True)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_eos_reads_the_appended_eos_position() -> None:
    # Rows end with an "EOS" vector; the eos pooler must return exactly it under either padding.
    eos = torch.arange(H, dtype=torch.float32)
    rows = [torch.cat([r, eos[None]]) for r in _items(4)]
    for side in ("left", "right"):
        out = EosPooler()(*_pad(rows, side))
        torch.testing.assert_close(out, eos.expand(len(rows), H), rtol=0, atol=0)


def test_index_helpers_on_gapped_masks() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3]
    assert first_token_index(mask).tolist() == [1, 0, 3]


def test_gradients_flow_only_to_pooled_positions() -> None:
    rows = _items(5)
    hidden, mask = _pad(rows, "left")
    hidden = torch.nan_to_num(hidden).requires_grad_(True)
    LastTokenPooler()(hidden, mask).sum().backward()
    assert hidden.grad is not None
    assert int((hidden.grad.abs().sum(-1) > 0).sum()) == len(rows)


def test_empty_row_and_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="no token"):
        LastTokenPooler()(torch.zeros(2, 3, H), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="expected hidden states"):
        MeanPooler()(torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("name,cls", [("last_token", LastTokenPooler), ("eos", EosPooler),
                                      ("mean", MeanPooler), ("cls", ClsPooler)])
def test_poolers_are_registered_plugins(name: str, cls: type) -> None:
    assert name in plugins.available("pooler")
    assert isinstance(plugins.build("pooler", name), cls)
    with pytest.raises(ConfigError, match="takes no arguments"):
        plugins.build("pooler", name, dim=3)

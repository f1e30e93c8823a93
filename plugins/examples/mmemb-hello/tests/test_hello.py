"""mmemb-hello's own tests, with the fixtures mmemb's pytest plugin provides."""

from __future__ import annotations

import mmemb_hello
import torch

from mmemb import plugins


def test_the_reweighter_meets_mmembs_contract(only_plugins, check_reweighter) -> None:
    with only_plugins(mmemb_hello):
        rw = plugins.build("reweighter", "hello_margin", beta=2.0, margin=0.2)
        neutral = plugins.build("reweighter", "hello_margin", beta=0.0)
    # outside the block every installed loss implementation (the tiled one too) is compared
    check_reweighter(rw, neutral=neutral)


def test_the_pooler_ignores_padding(only_plugins) -> None:
    with only_plugins(mmemb_hello):
        pool = plugins.build("pooler", "hello_max")
    hidden = torch.tensor([[[1.0, 5.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    assert pool(hidden, mask).tolist() == [[1.0, 5.0]]

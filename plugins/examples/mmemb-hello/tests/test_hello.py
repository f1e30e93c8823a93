"""mmemb-hello's own tests, with the marker and fixtures mmemb's pytest plugin provides: the
contracts a pooler and a reweighter must meet, and what is particular to this plugin's."""

from __future__ import annotations

import mmemb_hello
import pytest
import torch

from mmemb import plugins


# this plugin, and the tiled loss: check_reweighter compares every registered loss with the full
# matrix, so the tiled one (at several tile sizes) must be there
@pytest.mark.only_plugins(mmemb_hello, "mmemb_tiled")
def test_the_reweighter_meets_mmembs_contract(check_reweighter) -> None:
    from mmemb.testing.contracts import loss_implementations

    assert any(name.startswith("tiled") for name in loss_implementations())
    rw = plugins.build("reweighter", "hello_margin", beta=2.0, margin=0.2)
    check_reweighter(rw, neutral=plugins.build("reweighter", "hello_margin", beta=0.0))


def test_only_plugins_as_a_block(only_plugins) -> None:
    with only_plugins(mmemb_hello):  # the same isolation, for part of a test
        assert plugins.available("pooler") == ["hello_max"]
    assert "last_token" in plugins.available("pooler")  # afterwards the installed ones are back


@pytest.mark.only_plugins(mmemb_hello)  # the registries hold just this plugin for the test
def test_the_pooler_meets_mmembs_contract(check_pooler) -> None:
    # one finite vector per row, the same whatever the padding side, padded positions unread
    check_pooler(plugins.build("pooler", "hello_max"))


@pytest.mark.only_plugins(mmemb_hello)
def test_the_pooler_takes_the_maximum_over_real_tokens() -> None:
    pool = plugins.build("pooler", "hello_max")
    hidden = torch.tensor([[[1.0, 5.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    assert pool(hidden, mask).tolist() == [[1.0, 5.0]]

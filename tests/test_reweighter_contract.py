"""Every built-in reweighter passes the contract plugin authors run (mmemb.testing.contracts), and
the check catches a reweighter that breaks it."""

from __future__ import annotations

import pytest
import torch

from mmemb import plugins
from mmemb.loss import Reweighter
from mmemb.testing.contracts import check_reweighter

CASES = [
    ("none", {}, None),
    ("ega", {"alpha": 1.0}, {"alpha": 0.0}),
    ("ega", {"alpha": 2.0, "normalize": True, "hardness": "linear", "margin": 0.2},
     {"alpha": 0.0, "normalize": True, "hardness": "linear", "margin": 0.2}),
    ("ega", {"alpha": 1.0, "tau_h": 0.1, "fn_margin": 0.05}, {"alpha": 0.0}),
    ("llave", {"alpha": 9.0}, {"alpha": 0.0}),
    ("topk_mask", {"k": 3, "delta": 0.05}, None),
]


@pytest.mark.parametrize(("name", "options", "neutral"), CASES,
                         ids=[f"{n}{i}" for i, (n, _, _) in enumerate(CASES)])
def test_builtin_reweighters_meet_the_contract(name, options, neutral):
    rw = plugins.build("reweighter", name, **options)
    check_reweighter(rw, neutral=None if neutral is None else
                     plugins.build("reweighter", name, **neutral))


class RowDependent(Reweighter):
    """Breaks the contract: scales by the tile's own maximum, so the result depends on tiling."""

    transforms_probs = True

    def transform_probs(self, p, z, z_pos, is_pos, *, temperature, stats):
        return torch.where(is_pos, p, p * (1 + z.amax(dim=1, keepdim=True).abs()))


def test_the_check_catches_a_tiling_dependent_reweighter():
    with pytest.raises(AssertionError, match="differs from the full matrix"):
        check_reweighter(RowDependent())

"""2 gloo processes: gathered loss + DDP-style gradient averaging == one process on the whole batch.

Each rank embeds its own shard (different sizes on the two ranks) with the same small linear
"model" and a learnable temperature, calls ``gathered_contrastive_loss``, backpropagates, and
averages the parameter gradients across ranks as DDP does. Every rank also computes, alone and in
float64, ``contrastive_loss`` on the concatenated batch laid out by the collator's rule
(``assemble_candidates``); loss and parameter gradients must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_impls import impl

from mmemb.train.testing import run_workers

WORLD = 2
SIZES = (3, 5)  # queries per rank
K = 2  # hard negatives per query
D_IN, D = 7, 6
SCENARIOS = [  # (reweighter, options, tile_size, symmetric)
    ("none", {}, None, False),
    ("none", {}, 4, True),
    ("ega", {"alpha": 2.0, "normalize": True}, None, True),
    ("ega", {"alpha": 1.0, "fn_margin": 0.1}, 3, False),
    ("llave", {"alpha": 9.0}, 5, True),
    ("topk_mask", {"k": 3, "delta": 0.1}, None, True),
    ("topk_mask", {"k": 4, "delta": 0.05}, 3, False),
]


def _global_batch():
    g = torch.Generator().manual_seed(1234)
    n = sum(SIZES)
    xq = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    xp = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    xn = torch.randn(n, K, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    return xq, xp, xn, w


def _embed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.normalize(x @ w, dim=-1)


def _worker(rank: int, world: int) -> None:
    import mmemb.loss as L
    from mmemb import plugins

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        xq, xp, xn, w0 = _global_batch()
        lo = sum(SIZES[:rank])
        hi = lo + SIZES[rank]
        for name, options, tile, symmetric in SCENARIOS:
            rw = plugins.build("reweighter", name, **options)
            kw = dict(reweighter=rw, impl=impl(tile), symmetric=symmetric)

            # this rank: its shard only; the parameters are W and a learnable temperature
            w = w0.clone().requires_grad_()
            tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
            c_local, t_local = L.assemble_candidates(_embed(xp[lo:hi], w), _embed(xn[lo:hi], w))
            loss = L.gathered_contrastive_loss(
                _embed(xq[lo:hi], w), c_local, t_local, temperature=tau, **kw
            )
            loss.backward()
            grad = torch.cat([w.grad.flatten(), tau.grad.reshape(1)])
            dist.all_reduce(grad)
            grad /= WORLD  # what DDP does
            value = loss.detach().clone()
            dist.all_reduce(value)
            value /= WORLD

            # one process, the whole batch in the collator's layout
            w1 = w0.clone().requires_grad_()
            tau1 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
            c_all, t_all = L.assemble_candidates(_embed(xp, w1), _embed(xn, w1))
            ref = L.contrastive_loss(_embed(xq, w1), c_all, t_all, temperature=tau1, **kw)
            ref.backward()
            ref_grad = torch.cat([w1.grad.flatten(), tau1.grad.reshape(1)])

            where = f"rank {rank}, {name} {options} tile={tile} symmetric={symmetric}"
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, msg=where)
            torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-12, msg=where)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gathered_loss_gradients_equal_single_process():
    run_workers(_worker, WORLD)

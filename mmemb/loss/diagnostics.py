"""Training metrics of one loss call, off the hot path: what the reweighter did to the gradient."""

from __future__ import annotations

import math

import torch

from mmemb.loss.checks import acc_dtype, check_inputs, check_temperature
from mmemb.loss.full import row_statistics
from mmemb.loss.layout import DuplicateKeys, duplicate_mask, positive_mask
from mmemb.loss.reweighter import PLAIN, Reweighter

__all__ = ["HARD_FRACTION", "loss_diagnostics"]

HARD_FRACTION = 0.1
"""The share of each row's negatives (the most similar ones, at least one) called its hardest."""


@torch.no_grad()
def loss_diagnostics(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    reweighter: Reweighter | None = None,
    keys: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
) -> dict[str, float]:
    """Metrics of one direction of the loss, without gradient, in bounded memory.

    Rows are processed in chunks of at most ``max_elements`` logits; ``keys`` (M,) masks the
    columns that copy a row's positive, as the loss does. Returns floats:

    - ``loss``: the (one-direction) loss value;
    - ``pos_prob``: mean ``p_i+`` (softmax of the reweighted logits);
    - ``pos_sim`` / ``hardest_neg_sim``: mean positive similarity and mean largest negative one;
    - ``amplification``: how much more of the negatives' gradient lands on each row's hardest
      10 % than under plain InfoNCE — mean over rows of ``share(p̄) / share(p)``, where
      ``share(x)`` is the hardest negatives' part of ``Σ_neg x``. 1 for plain InfoNCE; above 1
      when a reweighter shifts the gradient towards hard negatives, whether or not it keeps the
      row's total (EGA with ``normalize: true`` keeps it, and still reports > 1);
    - ``hard_share``: mean ``share(p̄)`` itself;
    - ``negative_mass``: mean over rows of ``Σ_neg p̄ / Σ_neg p`` (1 when normalised), ``p`` being
      plain InfoNCE's softmax of the raw logits (also for reweighters that change the logits);
    - ``removed_fraction``: fraction of negatives removed from the softmax (``z' = −∞``);
    - ``masked_duplicates``: number of (row, column) entries masked as copies of the positive.

    Call it every N steps on detached embeddings; it recomputes the logits.
    """
    rw = reweighter or PLAIN
    check_inputs(
        q, c, targets, symmetric=False, reweighter=reweighter, where="loss_diagnostics", keys=keys
    )
    tau = check_temperature(temperature, "loss_diagnostics")
    acc = acc_dtype(q.dtype)
    b, m = q.shape[0], c.shape[0]
    targets = targets.long()
    dkeys = None if keys is None else DuplicateKeys.for_candidates(keys, targets)
    chunk = max(1, max_elements // max(m, 1))
    c_acc = c.detach().to(acc)
    sums = dict.fromkeys(("loss", "pos_prob", "pos_sim", "hardest_neg_sim"), 0.0)
    amp_sum, share_sum, mass_sum, rows_with_neg = 0.0, 0.0, 0.0, 0
    removed, negatives, masked = 0, 0, 0
    for r0 in range(0, b, chunk):
        r1 = min(b, r0 + chunk)
        t = targets[r0:r1]
        rows = torch.arange(r1 - r0, device=q.device)
        z = (q[r0:r1].detach().to(acc) / tau) @ c_acc.T
        is_pos = positive_mask(t, 0, m)
        dup = duplicate_mask(
            None if dkeys is None else dkeys.rows_slice(r0, r1), t, 0, m, is_pos=is_pos
        )
        neg = ~is_pos
        if dup is not None:
            z.masked_fill_(dup, -math.inf)
            neg &= ~dup
            masked += int(dup.sum())
        z_pos = z[rows, t].unsqueeze(1)
        stats = row_statistics(rw, z, z_pos, is_pos, tau)
        zt = rw.transform_logits(z, z_pos, is_pos, temperature=tau, stats=stats)
        lse = torch.logsumexp(zt, dim=1, keepdim=True)
        p = torch.exp(zt - lse)
        pbar = rw.transform_probs(p, z, z_pos, is_pos, temperature=tau, stats=stats)
        sums["loss"] += float((lse[:, 0] - zt[rows, t]).sum())
        sums["pos_prob"] += float(p[rows, t].sum())
        sums["pos_sim"] += float(z_pos.sum()) * tau
        n_neg = neg.sum(dim=1)
        if int(n_neg.max()) == 0:
            continue
        z_neg = torch.where(neg, z, torch.full_like(z, -math.inf))
        sums["hardest_neg_sim"] += float(z_neg.amax(dim=1)[n_neg > 0].sum()) * tau
        # the hardest ⌈10 %⌉ of each row's negatives: rank the negatives by their raw logit
        k_hard = torch.clamp((n_neg.to(acc) * HARD_FRACTION).ceil().long(), min=1)
        order = z_neg.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(m, device=q.device).expand_as(order))
        hard = neg & (rank < k_hard[:, None])
        # the baseline is plain InfoNCE's softmax of the raw logits, so a reweighter that acts on
        # the logits (LLaVE, the top-k mask) is measured against it too, not against itself
        p_plain = torch.softmax(z, dim=1) if rw.transforms_logits else p
        mass = torch.where(neg, p_plain, 0.0).sum(dim=1)
        mass_bar = torch.where(neg, pbar, 0.0).sum(dim=1)
        share = torch.where(hard, p_plain, 0.0).sum(dim=1) / mass
        share_bar = torch.where(hard, pbar, 0.0).sum(dim=1) / mass_bar
        ok = (mass > 0) & (mass_bar > 0) & (share > 0)
        amp_sum += float((share_bar[ok] / share[ok]).sum())
        share_sum += float(share_bar[ok].sum())
        mass_sum += float((mass_bar[ok] / mass[ok]).sum())
        rows_with_neg += int(ok.sum())
        removed += int((neg & torch.isneginf(zt)).sum())
        negatives += int(neg.sum())
    out = {k: v / b for k, v in sums.items()}
    out["amplification"] = amp_sum / rows_with_neg if rows_with_neg else 1.0
    out["hard_share"] = share_sum / rows_with_neg if rows_with_neg else 0.0
    out["negative_mass"] = mass_sum / rows_with_neg if rows_with_neg else 1.0
    out["removed_fraction"] = removed / negatives if negatives else 0.0
    out["masked_duplicates"] = float(masked)
    return out

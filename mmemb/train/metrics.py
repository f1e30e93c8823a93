"""Training metrics: JSON lines always (`metrics.jsonl`), TensorBoard when it is installed, and
the per-step similarity statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mmemb.loss import ContrastiveLoss

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per step; mirrors scalars to TensorBoard if available."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = (out_dir / "metrics.jsonl").open("a") if enabled else None
        self.tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; JSON lines are always written
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed job keeps every step it finished
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def step_statistics(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    negatives: int,
    loss: ContrastiveLoss,
    keys: torch.Tensor | None = None,
) -> dict[str, float]:
    """This rank's batch: mean cosine with the positive and with the query's own hard negatives,
    and the loss's diagnostics (``mmemb.loss.loss_diagnostics``: the hardest negative's
    similarity, how much the reweighter shifted the gradient towards hard negatives, ...).
    Recomputes the logits: call it at log steps, not every step."""
    with torch.no_grad():
        b = q.shape[0]
        qn = torch.nn.functional.normalize(q.float(), dim=-1)
        cn = torch.nn.functional.normalize(c.float(), dim=-1)
        stats = {"pos_sim": float((qn * cn[:b]).sum(-1).mean())}
        if negatives:
            negs = cn[b:].view(b, negatives, -1)
            stats["hard_neg_sim"] = float(torch.einsum("bd,bkd->bk", qn, negs).mean())
        diag = loss.diagnostics(q, c, targets, keys=keys)
        for key in ("hardest_neg_sim", "pos_prob", "amplification", "hard_share",
                    "negative_mass", "removed_fraction"):
            stats[key] = diag[key]
    return stats

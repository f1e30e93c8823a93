"""The collapse alarm: a run whose scores stopped telling candidates apart says so, once.

A contrastive run has collapsed when every candidate of a row gets the same score: the loss then
sits at ``ln(candidates per row)`` and the positive is no more similar than the hardest negative.
It happens with too high a learning rate, or with a reweighter that pushes every query away from
every candidate (un-normalised EGA from scratch: every negative starts "hard"). Nothing fails, so
without an alarm a user finds out only from the final score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmemb.errors import MmembError
from mmemb.loss import ContrastiveLoss

COLLAPSED_EXIT_CODE = 3
"""Exit status of `mmemb train` stopped by ``train.stop_on_collapse`` (1 is a user error)."""


class Collapsed(MmembError):
    """Training stopped because the run collapsed and ``train.stop_on_collapse`` is set."""


@dataclass
class CollapseAlarm:
    """Checked at each log interval after warm-up; fires once after ``patience`` collapsed checks
    in a row.

    A check is collapsed when the mean positive and hardest-negative similarities differ by less
    than ``sim_tol``, or — where uniform scores give exactly ``ln(candidates per row)``, i.e. one
    direction and a reweighter that leaves the logits alone — when the loss is within
    ``rel_tol`` of it. (LLaVE's logit offsets and the symmetric term's second direction change
    the loss of uniform scores, so only the similarities decide for them.) It is also collapsed
    when the mean positive similarity is below zero: every query pushed away from its own
    positive. Un-normalised EGA did that to a pretrained model (positive cosine -0.5, P@1 13
    points below the model before training) while the loss stayed well under ``ln M`` and the
    scores still differed; no healthy run of the studies in docs/results.md went below +0.11.
    """

    warmup_steps: int
    loss: ContrastiveLoss
    patience: int = 3
    rel_tol: float = 0.01
    sim_tol: float = 1e-3
    streak: int = 0
    fired: bool = False

    def check(
        self, step: int, *, loss: float, candidates_per_row: float, pos_sim: float,
        hardest_neg_sim: float,
    ) -> str | None:
        """The warning line when the alarm fires at this check, else None."""
        if self.fired or step <= self.warmup_steps or candidates_per_row <= 1:
            return None
        uniform = math.log(candidates_per_row)
        plain_logits = not (self.loss.symmetric or self.loss.reweighter.transforms_logits)
        flat_loss = plain_logits and abs(loss - uniform) <= self.rel_tol * uniform
        flat_sims = abs(pos_sim - hardest_neg_sim) < self.sim_tol
        repelled = pos_sim < 0.0
        self.streak = self.streak + 1 if (flat_loss or flat_sims or repelled) else 0
        if self.streak < self.patience:
            return None
        self.fired = True
        if flat_loss:
            what = f"loss {loss:.4f} ≈ ln({candidates_per_row:.0f}) = {uniform:.4f}"
        elif flat_sims:
            what = f"positive similarity {pos_sim:.4f} ≈ hardest negative {hardest_neg_sim:.4f}"
        else:
            what = (f"positive similarity {pos_sim:.4f} < 0 (queries pushed away from their own "
                    "positives)")
        return f"collapse at step {step}: {what} for {self.patience} log intervals. {self._fix()}"

    def _fix(self) -> str:
        rw = self.loss.reweighter
        config = getattr(rw, "config", None)
        if rw.name == "ega" and not getattr(config, "normalize", True):
            return ("Likely cause: un-normalised EGA amplifies every negative of a model whose "
                    "negatives all look hard. Fix: loss.reweighter.normalize=true, or a lower "
                    "train.lr / more train.warmup_steps.")
        return ("Likely cause: too high a learning rate for this batch. Fix: lower train.lr or "
                "raise train.warmup_steps; check the data gives distinct positives.")

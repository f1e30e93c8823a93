"""Loss reweighters: the Explicit Gradient Amplifier (EGA) and the ones it is compared with.

Registered in the ``reweighter`` registry (see docs/loss.md for the maths and references):

- ``none``: plain InfoNCE;
- ``ega``: the Explicit Gradient Amplifier (the default in recipes);
- ``llave``: LLaVE's hardness-weighted logits;
- ``topk_mask``: UniME-style false-negative filter + top-k hardest negatives.
"""

from __future__ import annotations

import mmemb
from mmemb.loss import PlainInfoNCE
from mmemb.plugins import Registrar
from mmemb_ega.ega import EGAConfig, ExplicitGradientAmplifier
from mmemb_ega.llave import LLaVEConfig, LLaVEReweighter
from mmemb_ega.plain import NoneConfig, build_plain
from mmemb_ega.topk import TopKMask, TopKMaskConfig

__all__ = [
    "EGAConfig",
    "ExplicitGradientAmplifier",
    "LLaVEConfig",
    "LLaVEReweighter",
    "NoneConfig",
    "PlainInfoNCE",
    "TopKMask",
    "TopKMaskConfig",
]


@mmemb.hookimpl
def mmemb_register_reweighters(registry: Registrar) -> None:
    registry.add("none", build_plain, config=NoneConfig, summary="plain InfoNCE, no reweighting")
    registry.add(
        "ega",
        ExplicitGradientAmplifier,
        config=EGAConfig,
        summary="Explicit Gradient Amplifier: p̄ = p·(1 + α·h) for hard negatives (Xue et al. 2025)",
    )
    registry.add(
        "llave",
        LLaVEReweighter,
        config=LLaVEConfig,
        summary="LLaVE hardness weighting: z' = z + α·sg(s) for negatives (Lan et al. 2025)",
    )
    registry.add(
        "topk_mask",
        TopKMask,
        config=TopKMaskConfig,
        summary="drop likely false negatives (s > s+ + δ), keep the k hardest (UniME-style)",
    )

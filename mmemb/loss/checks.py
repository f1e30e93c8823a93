"""Validation of the loss's inputs: every problem at once, each naming the value and the fix."""

from __future__ import annotations

import math
from typing import Any

import torch

from mmemb.errors import ConfigError
from mmemb.loss.reweighter import Reweighter

__all__ = ["acc_dtype", "check_inputs", "check_temperature", "shape_of"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_temperature(temperature: float | torch.Tensor, where: str) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ConfigError(
                [
                    f"{where}: temperature must be a number or a 1-element tensor "
                    f"(got shape {tuple(temperature.shape)})."
                ]
            )
        value = float(temperature.detach())
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ConfigError(
            [f"{where}: temperature must be a positive number (got {temperature!r})."]
        )
    else:
        value = float(temperature)
    if not (value > 0.0 and math.isfinite(value)):
        raise ConfigError(
            [
                f"{where}: temperature must be a positive finite number (got {value!r}); "
                "the usual value is 0.02."
            ]
        )
    return value


def check_inputs(
    q: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    symmetric: bool,
    reweighter: Reweighter | None,
    where: str,
    keys: torch.Tensor | None = None,
) -> None:
    """Every problem with one call's inputs at once (shapes, dtypes, devices, targets, options)."""
    problems: list[str] = []
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        problems.append(f"{where}: q must be a (B, D) tensor (got {shape_of(q)}).")
    if not isinstance(c, torch.Tensor) or c.dim() != 2:
        problems.append(f"{where}: c must be an (M, D) tensor (got {shape_of(c)}).")
    if problems:
        raise ConfigError(problems)
    if q.shape[0] < 1 or c.shape[0] < 1:
        problems.append(
            f"{where}: empty batch (q {tuple(q.shape)}, c {tuple(c.shape)}); "
            "every step needs at least one query and one candidate."
        )
    if q.shape[1] != c.shape[1]:
        problems.append(
            f"{where}: query and candidate embeddings differ in width (q {tuple(q.shape)}, "
            f"c {tuple(c.shape)}); both sides must come from encoders with the same output size."
        )
    if q.dtype != c.dtype or not q.dtype.is_floating_point:
        problems.append(
            f"{where}: q and c must share one floating dtype (got {q.dtype} and {c.dtype}); "
            "cast both to the same dtype."
        )
    if q.device != c.device:
        problems.append(
            f"{where}: q is on {q.device} but c on {c.device}; move both to one device."
        )
    if not isinstance(targets, torch.Tensor) or targets.shape != (q.shape[0],):
        problems.append(
            f"{where}: targets must be a (B,) tensor with B={q.shape[0]} (got {shape_of(targets)})."
        )
    elif targets.dtype not in (torch.int64, torch.int32):
        problems.append(f"{where}: targets must be integer column indices (got {targets.dtype}).")
    if keys is not None and (
        not isinstance(keys, torch.Tensor)
        or keys.shape != (c.shape[0],)
        or keys.dtype != torch.int64
    ):
        problems.append(
            f"{where}: keys must be a (M,) int64 tensor of candidate content keys with "
            f"M={c.shape[0]} (got {shape_of(keys)}"
            f"{', ' + str(keys.dtype) if isinstance(keys, torch.Tensor) else ''}); "
            "mmemb.data.collate.content_key makes them, or pass keys=None."
        )
    if reweighter is not None and not isinstance(reweighter, Reweighter):
        problems.append(
            f"{where}: reweighter must be a mmemb.loss.Reweighter "
            f"(got {type(reweighter).__name__}); build one with "
            "mmemb.plugins.build('reweighter', name, ...)."
        )
    if problems:
        raise ConfigError(problems)
    lo, hi = (int(v) for v in torch.aminmax(targets.detach()))
    if lo < 0 or hi >= c.shape[0]:
        raise ConfigError(
            [
                f"{where}: targets must be column indices in [0, {c.shape[0]}) (got values in "
                f"[{lo}, {hi}]); build them with candidate_targets/assemble_candidates."
            ]
        )
    if symmetric and torch.unique(targets).numel() != targets.numel():
        raise ConfigError(
            [
                f"{where}: symmetric=True needs one distinct positive per query, but some queries "
                "share a positive column; use symmetric=False for this batch."
            ]
        )


def shape_of(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__

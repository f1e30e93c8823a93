"""The uniform forward (ZeRO-3, trainable towers a chunk has no input for): when a tower must run
on a placeholder input, and how its output joins the graph as an exact zero without moving the
random streams."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

def needs_placeholder(uniform: bool, *parts: Any) -> bool:
    """Whether a forward must run a tower the batch has no input for: always under a uniform
    forward (ZeRO-3), and while training when the tower has trainable weights -- otherwise a
    chunk's embeddings may depend on no trainable weight at all (CLIP with LoRA on the text tower
    and an image-only GradCache chunk), its backward fails, and data-parallel ranks would
    exchange gradients for different parameter sets. `parts` are the tower's modules and
    parameters (None entries are skipped)."""
    import torch

    if uniform:
        return True
    if not torch.is_grad_enabled():
        return False
    for part in parts:
        if part is None:
            continue
        params = [part] if isinstance(part, torch.nn.Parameter) else part.parameters()
        if any(p.requires_grad for p in params):
            return True
    return False


def zero_from(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exactly 0, as a scalar that depends on `tensors`: adding it to an output puts the modules
    that produced them in the autograd graph (their gradients are zeros) without changing the
    output. Used by backbones under `require_uniform_forward`."""
    import torch

    # nan_to_num: 0 * inf is NaN, and an fp16 tower may overflow on a blank input.
    total = sum((t.float().sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))
    return torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0)


def placeholder_rng(device: torch.device) -> AbstractContextManager[object]:
    """Run a placeholder forward without drawing from the global random streams: it runs only
    while gradients are on, so GradCache's no-grad first pass skips it, and its dropout draws
    would otherwise shift the replayed chunk's masks away from the first pass's. (Its output is
    multiplied by zero, so its own masks do not matter.)"""
    import torch

    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

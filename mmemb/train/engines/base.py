"""The interface every training engine implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mmemb.distributed import DistEnv
from mmemb.model import Encoder
from mmemb.recipe import LoadedRecipe


@dataclass
class EngineSetup:
    """What an engine is built from."""

    loaded: LoadedRecipe
    encoder: Encoder
    env: DistEnv
    device: torch.device


class Engine(abc.ABC):
    """Forward, backward, optimizer step and the engine's part of a checkpoint.

    A step is either `forward_pair` then one `backward`, or (GradCache) no-grad `forward` calls,
    then per chunk a `forward` and its `backward`, the last chunk's with ``sync=True`` and
    ``last=True`` (gradients are exchanged across ranks only then); then `step`, which clips,
    updates and zeroes the gradients.
    """

    name: str = "?"

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        self.encoder = setup.encoder
        self.device = setup.device
        self.env = setup.env

    # -- the step
    @abc.abstractmethod
    def forward(self, inputs: Mapping[str, torch.Tensor], *, sync: bool = True) -> torch.Tensor:
        """Embeddings (float32) of a processed batch, under the engine's precision. ``sync=False``
        marks a forward whose backward is not the step's last (GradCache's chunks before the
        last): a data-parallel engine may then keep its gradients local until the last one."""

    def forward_pair(self, query: Mapping[str, torch.Tensor],
                     candidates: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of both sides of a batch, for a step with one backward."""
        return self.forward(query), self.forward(candidates)

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Accumulate the gradients of the scalar `loss`; `last` marks the step's final call."""

    @abc.abstractmethod
    def step(self) -> float:
        """Exchange gradients if not done, clip, update, advance the lr; returns the grad norm."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate the last step used."""

    @property
    @abc.abstractmethod
    def precision(self) -> str:
        """fp32, bf16 or fp16, as the engine actually runs."""

    # -- checkpoints (every rank calls these; files may be per rank)
    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write model (trainable) weights, optimizer and scheduler state into `directory`."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) trainable weights by name, on the CPU; called on every rank."""

    def final_encoder(self) -> Encoder | None:
        """On rank 0, an encoder holding the full trained weights that runs without the other
        ranks (for the final evaluation and the saved model); None elsewhere. Every rank calls
        it (gathering partitioned weights is collective)."""
        return self.encoder if self.env.is_main else None

    def autocast(self) -> AbstractContextManager[object]:
        """The context the forward runs in (mixed precision for the torch engine)."""
        return nullcontext()

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def close(self) -> None:  # noqa: B027 - most engines hold nothing to release
        """Release engine resources at the end of training."""

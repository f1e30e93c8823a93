"""The encoder: backbone -> pooler -> (optional) L2 normalisation, and the interfaces plugins fill.

A backbone owns its processor. The processor (`Backbone.processor`) is a small picklable callable
that turns `Item`s into tensors on the CPU, so it runs inside data-loader workers; the backbone's
`forward` turns those tensors into hidden states. A pooler turns hidden states and the attention
mask into one vector per item. Nothing here knows a concrete model: those are plugins.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from mmemb.data.schema import Item
from mmemb.errors import MmembError

Side = Literal["query", "target"]
"""Which side of a pair an item is on; backbones may prompt the two sides differently."""

ModelInputs = dict[str, torch.Tensor]


class BackboneOutput(NamedTuple):
    """Hidden states (N, L, H) that poolers read, and the attention mask (N, L), 1 = token.

    A named tuple rather than a dataclass: DeepSpeed ZeRO-3 finds the tensors in a module's
    output (to hook its backward) only inside tuples, lists and dicts."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor


class InputProcessor(abc.ABC):
    """Turns items into model inputs on the CPU. Must be picklable (it runs in data workers)."""

    @abc.abstractmethod
    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        """A batch of tensors for `Backbone.forward`; every tensor's first dimension is len(items)
        unless the backbone documents otherwise (e.g. image patches)."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write the files needed to rebuild this processor next to the model."""

    def split(self, inputs: ModelInputs, size: int) -> list[ModelInputs]:
        """Split a processed batch into chunks of `size` items (GradCache's chunks).

        The default slices every tensor's rows. A processor whose padding can be dropped per
        chunk overrides it (see `trim_padding`): a chunk of short texts from a batch padded to a
        long image prompt then costs its own length, not the batch's."""
        return split_rows(inputs, size)


class ChunkingError(MmembError):
    """A processed batch cannot be split into chunks as `train.grad_cache` asks."""


def split_rows(inputs: ModelInputs, size: int) -> list[ModelInputs]:
    """Slices of `size` rows of every tensor (each must have one row per item)."""
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ChunkingError(
            f"train.grad_cache: the backbone's inputs do not have one row per item ({sizes}), so "
            "they cannot be chunked. Drop train.grad_cache for this backbone."
        )
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def trim_padding(inputs: ModelInputs, token_keys: Sequence[str]) -> ModelInputs:
    """`inputs` without the columns that are padding in every row (by ``attention_mask``), for
    the (N, L) tensors named in `token_keys`. Rows whose position ids come from the mask (left
    or right padding) compute the same hidden states trimmed or not."""
    mask = inputs["attention_mask"].bool().any(dim=0)
    used = mask.nonzero()
    if used.numel() == 0 or bool(mask.all()):
        return inputs
    start, stop = int(used[0]), int(used[-1]) + 1
    return {k: (v[:, start:stop] if k in token_keys else v) for k, v in inputs.items()}


class Backbone(nn.Module, abc.ABC):
    """A model that maps processed items to hidden states."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int:
        """Width H of the hidden states."""

    @property
    @abc.abstractmethod
    def processor(self) -> InputProcessor:
        """The processor that prepares inputs for this backbone."""

    @abc.abstractmethod
    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        """Hidden states and attention mask for a processed batch."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Save weights (safetensors), config and processor so the backbone reloads from `path`."""

    appends_eos: bool | None = None
    """Whether every row the processor makes ends with the tokenizer's EOS token (None: the
    backbone does not say). Poolers that read the EOS check it."""

    uniform_forward: bool = False
    """True once `require_uniform_forward` was called."""

    def require_uniform_forward(self) -> list[nn.Parameter]:
        """From now on, run the same modules in the same order whatever a batch holds.

        Engines that partition the weights across ranks (DeepSpeed ZeRO-3) call this before they
        wrap the model: they gather a module's weights when a rank enters it, so a rank whose
        chunk is text-only and skips the vision tower would mismatch the collectives of a rank
        whose chunk has images. A backbone with modality-specific modules then runs each of them
        on a placeholder input when a batch has nothing for it, adding exactly zero to its output.

        Returns the parameters the backbone's own forward reads outside their owning module's
        forward; the engine must gather them when the backbone runs (for DeepSpeed,
        `register_external_parameter`). The base class has nothing to change.
        """
        self.uniform_forward = True
        return []


class Pooler(nn.Module, abc.ABC):
    """Hidden states (N, L, H) + attention mask (N, L) -> embeddings (N, H)."""

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per item."""

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise `ConfigError` if this pooler cannot read what `backbone` produces (called when
        an `Encoder` is built, so a mismatch fails before training, not silently during it)."""


class Encoder(nn.Module):
    """Backbone + pooler + optional L2 normalisation: items in, one embedding per item out."""

    def __init__(self, backbone: Backbone, pooler: Pooler, *, normalize: bool = True,
                 check: bool = True) -> None:
        """`check`: let the pooler refuse the backbone (`Pooler.check_backbone`); off when
        reloading a saved encoder, which must load as it was trained."""
        super().__init__()
        if check:
            pooler.check_backbone(backbone)
        self.backbone = backbone
        self.pooler = pooler
        self.normalize = normalize

    @property
    def processor(self) -> InputProcessor:
        return self.backbone.processor

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(inputs)
        emb = self.pooler(out.hidden_states, out.attention_mask)
        if self.normalize:
            emb = nn.functional.normalize(emb.float(), dim=-1)
        return emb

    @torch.inference_mode()
    def encode(self, items: Sequence[Item], *, side: Side, batch_size: int = 32) -> torch.Tensor:
        """Embed `items` in batches (no gradients); returns a float32 CPU tensor (N, D)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = []
        for start in range(0, len(items), batch_size):
            batch = self.processor(items[start : start + batch_size], side=side)
            batch = {k: v.to(device) for k, v in batch.items()}
            chunks.append(self(batch).float().cpu())
        self.train(was_training)
        if not chunks:
            return torch.empty(0, self.backbone.hidden_size)
        return torch.cat(chunks)

"""GradCache: a large contrastive batch with the activation memory of a small chunk.

Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup". The loss couples every query with every candidate, so the batch cannot simply be split
into gradient-accumulation micro-batches. Instead:

1. embed every chunk without an autograd graph (recording the RNG state before each chunk);
2. compute the loss on the detached embeddings — including the cross-rank gather and the
   reweighter — and its gradient with respect to every local embedding;
3. re-run each chunk with a graph, replaying its RNG state so dropout draws the same masks, and
   back-propagate the cached embedding gradient through it (``backward(<emb, grad>)``, a scalar
   whose gradient w.r.t. the embeddings is exactly the cached one).

The parameter gradients equal those of the full-batch computation: the loss's gradient factors
through the embeddings, and each embedding depends on its own chunk only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmemb.model import ChunkingError, ModelInputs, split_rows

__all__ = ["ChunkingError", "grad_cache_step", "split_inputs"]


def split_inputs(inputs: ModelInputs, chunk: int) -> list[ModelInputs]:
    """Row slices of a processed batch (`InputProcessor.split`'s default)."""
    return split_rows(inputs, chunk)


@dataclass
class RngState:
    """The generator states a forward draws from (CPU, and the CUDA device if any)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the global state afterwards is as before the body."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


LossOnEmbeddings = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Split = Callable[[ModelInputs, int], list[ModelInputs]]
"""``split(inputs, size)``: chunks of a processed batch (`InputProcessor.split`)."""
Forward = Callable[[Mapping[str, torch.Tensor], bool], torch.Tensor]
"""``forward(inputs, last)``: embeddings; `last` marks the forward whose backward ends the step
(a data-parallel engine exchanges gradients only in that one)."""
Backward = Callable[[torch.Tensor, bool], None]
"""``backward(loss, last)``: accumulate the gradients of `loss`; `last` as for `Forward`."""


@dataclass
class CachedStep:
    loss: torch.Tensor
    """The (detached) loss of the step."""
    q: torch.Tensor
    c: torch.Tensor
    """Detached embeddings of the local queries and candidates."""


def grad_cache_step(
    forward: Forward,
    backward: Backward,
    query: ModelInputs,
    candidates: ModelInputs,
    loss_fn: LossOnEmbeddings,
    *,
    query_chunk: int,
    candidate_chunk: int,
    device: torch.device,
    check_loss: Callable[[torch.Tensor], None] | None = None,
    split: Split = split_inputs,
) -> CachedStep:
    """One GradCache step: leaves the parameter gradients of ``loss_fn(encode(query),
    encode(candidates))`` accumulated through `forward` and `backward` (called once per chunk, the
    last chunk's calls with ``last=True``). `check_loss` sees the loss before any backward (to
    stop on NaN). `split` chunks the inputs (the processor's, which may trim padding)."""
    chunks = [(c, "q") for c in split(query, query_chunk)]
    chunks += [(c, "c") for c in split(candidates, candidate_chunk)]
    states: list[RngState] = []
    embs: list[torch.Tensor] = []
    with torch.no_grad():
        for inputs, _ in chunks:
            states.append(RngState.capture(device))
            embs.append(forward(inputs, False))
    n_q = sum(1 for _, side in chunks if side == "q")
    q = torch.cat(embs[:n_q]).detach().requires_grad_(True)
    c = torch.cat(embs[n_q:]).detach().requires_grad_(True)
    loss = loss_fn(q, c)
    if check_loss is not None:
        check_loss(loss)
    grad_q, grad_c = torch.autograd.grad(loss, [q, c])
    grads = list(grad_q.split([e.shape[0] for e in embs[:n_q]]))
    grads += list(grad_c.split([e.shape[0] for e in embs[n_q:]]))
    for i, ((inputs, _), state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        last = i == len(chunks) - 1
        with state.replayed():
            emb = forward(inputs, last)
        # <emb, grad> has gradient `grad` w.r.t. emb: backpropagates the cached gradient.
        backward((emb * grad.to(emb.dtype)).sum(), last)
    return CachedStep(loss.detach(), q.detach(), c.detach())

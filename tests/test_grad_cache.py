"""GradCache: the parameter gradients equal those of the plain full-batch computation (float64),
dropout is replayed, and one data-parallel step over 2 processes equals the 1-process step."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from mmemb import plugins
from mmemb.data.collate import Batch, Collator
from mmemb.encoder_io import build_encoder
from mmemb.lora import LoraSpec, apply_lora
from mmemb.loss import contrastive_loss
from mmemb.model import Encoder
from mmemb.train.grad_cache import ChunkingError, grad_cache_step, split_inputs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")
NEG = 2


def make_encoder(*, lora: bool, dropout: float = 0.0,
                 towers: tuple[str, ...] = ("language",)) -> Encoder:
    enc = build_encoder({"name": "llava_onevision", "path": TINY, "init": "random", "seed": 3},
                        {"name": "last_token"})
    if lora:
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        apply_lora(enc.backbone, LoraSpec.model_validate({"r": 4, "dropout": dropout,
                                                          "towers": list(towers)}))
    return enc.double()


def make_batch(enc: Encoder, start: int, n: int) -> Batch:
    src = plugins.build("source", "synthetic", n=64, seed=5, negatives=NEG)
    samples = [src.sample(i) for i in range(start, start + n)]
    batch = Collator(enc.processor, num_negatives=NEG)(samples)
    for inputs in (batch.query, batch.candidates):
        for k, v in inputs.items():
            if v.is_floating_point():
                inputs[k] = v.double()
    return batch


def grads(enc: Encoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-7, atol=1e-12,
                                   msg=functools.partial("{}: {}".format, name))


def ega() -> Any:
    return plugins.build("reweighter", "ega", alpha=1.0)


@pytest.mark.parametrize(("lora", "trim"), [(False, False), (True, False), (True, True)],
                         ids=["full", "lora", "lora-trimmed-chunks"])
def test_grad_cache_gradients_equal_full_batch(lora: bool, trim: bool) -> None:
    """`trim`: chunks made by the processor, which drops each chunk's all-padding columns (a
    chunk then has its own length, not the batch's): the gradients are still the full batch's."""
    enc = make_encoder(lora=lora)
    batch = make_batch(enc, 0, 6)
    rw = ega()

    def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(q, c, batch.targets, temperature=0.05, reweighter=rw)

    loss = loss_fn(enc(batch.query), enc(batch.candidates))
    loss.backward()
    reference = grads(enc)
    enc.zero_grad(set_to_none=True)

    calls: list[bool] = []

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        calls.append(last)
        surrogate.backward()

    split = enc.processor.split if trim else split_inputs
    # Text and image items alternate: chunks of one item make short text-only chunks.
    q_chunk, c_chunk = (1, 1) if trim else (4, 5)
    if trim:  # the trimming is real: some chunk is narrower than the batch
        widths = [c["input_ids"].shape[1] for c in split(batch.candidates, c_chunk)]
        assert min(widths) < batch.candidates["input_ids"].shape[1]
    out = grad_cache_step(lambda x, last: enc(x), backward, batch.query, batch.candidates, loss_fn,
                          query_chunk=q_chunk, candidate_chunk=c_chunk,
                          device=torch.device("cpu"), split=split)
    n_chunks = -(-6 // q_chunk) + -(-6 * (1 + NEG) // c_chunk)  # 6 queries
    assert calls == [False] * (n_chunks - 1) + [True]
    torch.testing.assert_close(out.loss, loss.detach())
    assert_same_grads(grads(enc), reference)
    if lora:  # only the adapters learn
        assert all("lora_" in n for n in reference)


def _dropout_grads(enc: Encoder, batch: Batch, q_chunk: int, c_chunk: int,
                   seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(reference, GradCache) gradients from RNG state `seed`: the reference embeds the same
    chunks with a graph, so its dropout masks are those GradCache's first pass must draw."""
    rw = ega()

    def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(q, c, batch.targets, temperature=0.05, reweighter=rw)

    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    qs = [enc(x) for x in split_inputs(batch.query, q_chunk)]
    cs = [enc(x) for x in split_inputs(batch.candidates, c_chunk)]
    loss_fn(torch.cat(qs), torch.cat(cs)).backward()
    reference = grads(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    grad_cache_step(lambda x, last: enc(x), lambda s, last: s.backward(), batch.query,
                    batch.candidates, loss_fn, query_chunk=q_chunk, candidate_chunk=c_chunk,
                    device=torch.device("cpu"))
    return reference, grads(enc)


def test_grad_cache_replays_dropout() -> None:
    """With LoRA dropout the re-run must draw the masks of the first (no-graph) pass."""
    enc = make_encoder(lora=True, dropout=0.3)
    enc.train()
    batch = make_batch(enc, 8, 4)
    reference, cached = _dropout_grads(enc, batch, 3, 5, seed=11)
    assert_same_grads(cached, reference)
    # and the masks matter: another RNG state gives other gradients
    _, other = _dropout_grads(enc, batch, 3, 5, seed=12)
    assert any(not torch.allclose(other[n], reference[n]) for n in reference)


def test_grad_cache_dropout_with_a_trainable_vision_tower_and_text_only_chunks() -> None:
    """Vision adapters are trainable, so a text-only chunk runs the vision tower on a placeholder
    -- but only with a graph (the replay), not in the no-graph first pass. The placeholder must
    not draw from the random streams, or the replay's dropout masks would differ from the first
    pass's and the cached gradients would be wrong."""
    enc = make_encoder(lora=True, dropout=0.3, towers=("language", "vision"))
    enc.train()
    batch = make_batch(enc, 8, 4)  # queries alternate text / image: chunks of 1 are text-only
    reference, cached = _dropout_grads(enc, batch, 1, 2, seed=11)
    assert any("vision_tower" in n for n in reference)
    assert_same_grads(cached, reference)


def test_split_inputs_refuses_ragged_batches() -> None:
    inputs = {"input_ids": torch.zeros(4, 3), "pixel_values": torch.zeros(2, 5)}
    with pytest.raises(ChunkingError, match="one row per item"):
        split_inputs(inputs, 2)


# -- one step, 1 process vs 2 processes (same global batch) ---------------------------------------


def _step_grads(rank: int, world: int, lora: bool, grad_cache: bool, out: str) -> None:
    """Rank `rank` of `world`: its share of the 8-sample batch, one step's averaged gradients."""
    from mmemb.distributed import DistEnv, init_distributed, shutdown_distributed
    from mmemb.loss import ContrastiveLoss
    from mmemb.train.engines.base import EngineSetup
    from mmemb.train.engines.torch_engine import TorchEngine
    from mmemb.train.step import compute_step
    from mmemb.train.testing import tiny_recipe

    env = DistEnv(rank, world, rank)
    started = init_distributed(env, torch.device("cpu"))
    try:
        train: dict[str, Any] = {"batch_size": 8 // world, "negatives": NEG}
        if grad_cache:
            train["grad_cache"] = {"query_chunk": 3, "candidate_chunk": 5}
        loaded = tiny_recipe(TINY, "unused", "unused", check=False, **train)
        enc = make_encoder(lora=lora)
        engine = TorchEngine(EngineSetup(loaded, enc, env, torch.device("cpu")))
        share = 8 // world
        batch = make_batch(enc, rank * share, share)
        loss = ContrastiveLoss(temperature=loaded.recipe.loss.temperature,
                               reweighter=plugins.build("reweighter", "ega", alpha=1.0))
        compute_step(engine, batch, loss, loaded.recipe.train, check_loss=lambda loss: None)
        if rank == 0:
            torch.save(grads(enc), out)
    finally:
        shutdown_distributed(started)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("lora", "grad_cache"),
    [(False, False), (True, True)],
    ids=["full-plain", "lora-gradcache"],
)
def test_two_processes_equal_one(tmp_path: Path, lora: bool, grad_cache: bool) -> None:
    from mmemb.train.testing import run_workers

    one = tmp_path / "one.pt"
    _step_grads(0, 1, lora, False, str(one))
    two = tmp_path / "two.pt"
    run_workers(_step_grads, 2, lora, grad_cache, str(two))
    got, want = torch.load(two, weights_only=True), torch.load(one, weights_only=True)
    # DDP leaves a parameter no rank used without a gradient, as one process does
    assert set(got) == set(want)
    # Encoder.forward normalises in float32, so the embeddings carry float32 rounding, which a
    # different batch composition (padding, gather order) changes: compare per tensor at 1e-5 of
    # its scale.
    assert want
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()) + 1e-12, (name, err, float(ref.abs().max()))


@pytest.mark.parametrize("side", ["left", "right"])
def test_trim_padding_drops_only_all_padding_columns(side: str) -> None:
    from mmemb.model import trim_padding

    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]) if side == "left" else \
        torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    inputs = {"input_ids": torch.arange(8).view(2, 4), "attention_mask": mask,
              "pixel_values": torch.zeros(2, 3)}
    out = trim_padding(inputs, ("input_ids", "attention_mask"))
    keep = slice(1, 4) if side == "left" else slice(0, 3)
    assert torch.equal(out["input_ids"], inputs["input_ids"][:, keep])
    assert torch.equal(out["attention_mask"], mask[:, keep])
    assert out["pixel_values"] is inputs["pixel_values"]

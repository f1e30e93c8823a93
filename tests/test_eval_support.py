"""Shared pieces of the eval tests: a small real encoder, deterministic eval data, plugin set-up.

The encoder is a genuine (tiny) model: a processor that turns an item's side marker, instruction,
image digest and text into byte-level tokens, an embedding + linear + tanh backbone initialised from
a seed, and masked mean pooling. Rankings in the tests follow from its embeddings; expected scores
are recomputed independently (item by item, no de-duplication) from the same encoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

import mmemb
from mmemb.data.schema import Item, Sample
from mmemb.model import Backbone, BackboneOutput, Encoder, InputProcessor, Pooler, Side

N_BYTES, N_IMAGE = 256, 64
QUERY_TOKEN, TARGET_TOKEN, PAD = N_BYTES + N_IMAGE, N_BYTES + N_IMAGE + 1, N_BYTES + N_IMAGE + 2
VOCAB = PAD + 1


class DigestTokenProcessor(InputProcessor):
    """Items -> token ids: side marker, instruction bytes, 8 image-digest tokens, text bytes.

    Not `mmemb.data.testing.ByteProcessor`: that one decodes images to pixel values, which
    `ByteBackbone` (token embeddings only) would ignore. Here an image becomes tokens of its
    digest, so two different images give different embeddings and the eval tests can rank them;
    rows are padded to the longest, not to a fixed length."""

    def __init__(self, max_len: int = 48) -> None:
        self.max_len = max_len

    def tokens(self, item: Item, side: Side) -> list[int]:
        toks = [QUERY_TOKEN if side == "query" else TARGET_TOKEN]
        if item.instruction:
            toks += list(item.instruction.encode()[:12])
        if item.image is not None:
            toks += [N_BYTES + b % N_IMAGE for b in hashlib.sha256(item.image).digest()[:8]]
        if item.text:
            toks += list(item.text.encode())
        return toks[: self.max_len]

    def __call__(self, items: Sequence[Item], *, side: Side) -> dict[str, torch.Tensor]:
        rows = [self.tokens(it, side) for it in items]
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, "processor.json").write_text(json.dumps({"max_len": self.max_len}))


class ByteBackbone(Backbone):
    """Embedding + linear + tanh over byte tokens; weights from a seeded generator."""

    def __init__(self, dim: int = 16, seed: int = 0, max_len: int = 48) -> None:
        super().__init__()
        self.dim, self.seed = dim, seed
        self._processor = DigestTokenProcessor(max_len)
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, dim, generator=gen))
            self.proj.weight.copy_(torch.randn(dim, dim, generator=gen) / dim**0.5)
            self.proj.bias.zero_()
        self.forward_items = 0  # items seen by forward: lets tests see what was (re-)encoded

    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def processor(self) -> InputProcessor:
        return self._processor

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        self.forward_items += int(inputs["input_ids"].shape[0])
        h = torch.tanh(self.proj(self.embed(inputs["input_ids"])))
        return BackboneOutput(hidden_states=h, attention_mask=inputs["attention_mask"])

    def save_pretrained(self, path: str | Path) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, out / "model.safetensors")
        Path(out, "bytes_config.json").write_text(
            json.dumps({"dim": self.dim, "seed": self.seed, "max_len": self._processor.max_len})
        )
        self._processor.save_pretrained(out)


class MeanPooler(Pooler):
    """Masked mean over tokens."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * m).sum(1) / m.sum(1).clamp(min=1)


class BytesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = 16
    seed: int = 0
    max_len: int = 48
    path: str | None = None


def build_backbone(cfg: BytesConfig) -> ByteBackbone:
    if cfg.path is None:
        return ByteBackbone(cfg.dim, cfg.seed, cfg.max_len)
    saved = json.loads(Path(cfg.path, "bytes_config.json").read_text())
    bb = ByteBackbone(saved["dim"], saved["seed"], saved["max_len"])
    bb.load_state_dict(load_file(Path(cfg.path, "model.safetensors")))
    return bb


class EvalTestComponents:
    """Registers the test backbone and pooler, as a plugin package would."""

    @mmemb.hookimpl
    def mmemb_register_backbones(self, registry: Any) -> None:
        registry.add("test_bytes", build_backbone, config=BytesConfig, summary="eval tests")

    @mmemb.hookimpl
    def mmemb_register_poolers(self, registry: Any) -> None:
        registry.add("test_mean", MeanPooler, summary="eval tests")


EVAL_PLUGINS: tuple[object, ...] = ("mmemb_eval", EvalTestComponents())
"""Only the eval plugin and the test components (other plugins may be mid-change elsewhere):
``pytestmark = pytest.mark.only_plugins(*EVAL_PLUGINS)``, or ``with only_plugins(*EVAL_PLUGINS)``
where no fixture reaches (a spawned process)."""


def make_encoder(seed: int = 0, dim: int = 16) -> Encoder:
    return Encoder(ByteBackbone(dim=dim, seed=seed), MeanPooler(), normalize=True)


def encoded_items(encoder: Encoder) -> int:
    """How many items the encoder's backbone has run forward so far."""
    backbone = encoder.backbone
    assert isinstance(backbone, ByteBackbone)
    return backbone.forward_items


# --- data ---------------------------------------------------------------------------------------

WORDS = ("red", "green", "blue", "circle", "square", "star", "above", "below", "small", "large",
         "cat", "dog", "tree", "car", "house", "sky")


def png(seed: int, size: int = 4) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def phrase(rng: random.Random, n: int = 3) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_samples(
    dataset: str, n: int, *, n_negs: int = 4, seed: int = 0, shared_labels: int = 0,
    dup_positive_every: int = 0, images: bool = True,
) -> list[Sample]:
    """Eval samples: image(+text) queries whose positive repeats the query's words (so a model can
    rank it first), negatives with other words.

    `shared_labels` > 0 makes a classification-style set: every query ranks the same label list
    (rotated so its own label is first). `dup_positive_every` = k copies the positive into the
    negatives of every k-th sample (an exact tie).
    """
    rng = random.Random(f"{dataset}-{seed}")
    labels = [f"{phrase(rng, 2)} label{i}" for i in range(shared_labels)]
    out = []
    for i in range(n):
        words = phrase(rng, 3)
        image = png(zlib.crc32(f"{dataset}/{seed}/{i}".encode())) if images and i % 2 == 0 else None
        query = Item(text=words, image=image, instruction="Find the match:")
        if shared_labels:
            own = i % shared_labels
            pos = Item(text=labels[own])
            negs = [Item(text=lab) for j, lab in enumerate(labels) if j != own]
            query = Item(text=f"{labels[own].split()[0]} {words}", image=query.image,
                         instruction=query.instruction)
        else:
            pos = Item(text=words)
            negs = [Item(text=phrase(rng, 3)) for _ in range(n_negs)]
            if images and i % 3 == 0:
                negs.append(Item(image=png(50_000 + i)))
        if dup_positive_every and i % dup_positive_every == 0:
            negs.insert(1 % (len(negs) + 1), Item(text=pos.text, image=pos.image))
        out.append(Sample(id=f"{dataset}-{i}", dataset=dataset, query=query, pos=pos, negs=negs))
    return out


def reference_p_at_1(encoder: Encoder, samples: Sequence[Sample]) -> tuple[float, int]:
    """P@1 (percent) and tie count computed the way VLM2Vec's eval.py does, independently of
    mmemb.eval: embeddings keyed by (text, image, instruction), each item encoded on its own,
    float32 ``np.dot`` and ``np.argmax`` over the list with the positive first."""
    memo: dict[tuple[str, Any, Any, Any], np.ndarray] = {}

    def emb(item: Item, side: Side) -> np.ndarray:
        key = (side, item.text, item.image, item.instruction)
        if key not in memo:
            memo[key] = encoder.encode([item], side=side).numpy()[0]
        return memo[key]

    hits = ties = 0
    for s in samples:
        q = emb(s.query, "query")
        c = np.stack([emb(it, "target") for it in s.candidates])
        scores = np.dot(c, q)
        hits += int(np.argmax(scores) == 0)
        ties += int(scores[1:].max() == scores[0]) if len(scores) > 1 else 0
    return 100.0 * hits / len(samples), ties

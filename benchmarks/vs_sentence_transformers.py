"""mmemb vs sentence-transformers on the same contrastive training step (CPU or GPU).

    pip install sentence-transformers          # not an mmemb dependency
    python benchmarks/vs_sentence_transformers.py [--batch 64] [--hidden 256] [--layers 4]

Both libraries train the same locally built BERT-style text encoder (random init, saved once and
loaded by both) on the same (query, positive, hard negative) text triples:

- ``plain``: mmemb's step (`hf_text` backbone, `cls` pooler, InfoNCE at temperature 0.05 over
  in-batch + hard negatives, `reweighter: none`) against sentence-transformers'
  `MultipleNegativesRankingLoss` (cosine similarity, scale 20 = 1 / 0.05): the same loss;
- ``gradcache``: mmemb's `train.grad_cache` against `CachedMultipleNegativesRankingLoss`, with
  the same chunk size.

A step is: tokenize the batch, encode, loss, backward, AdamW step, zero grads. Before timing, the
first step's loss of each pair is printed side by side (they must agree: the same work). Then the
variants alternate step by step in one process and the median samples/s (queries per second) is
reported, with mmemb's time relative to sentence-transformers'.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _triples(n: int) -> list[tuple[str, str, str]]:
    from mmemb.testing.corpus import caption_corpus

    corpus = caption_corpus(3 * n, seed=0)
    return [(corpus[3 * i], corpus[3 * i + 1], corpus[3 * i + 2]) for i in range(n)]


def _mmemb(path: Path, triples: list[tuple[str, str, str]], chunk: int | None,
           device: str) -> tuple[Callable[[], float], torch.nn.Module]:
    from mmemb import plugins
    from mmemb.data.collate import Collator
    from mmemb.data.schema import Item, Sample
    from mmemb.distributed import DistEnv
    from mmemb.loss import build_loss
    from mmemb.recipe import load_recipe
    from mmemb.train.engines.base import EngineSetup
    from mmemb.train.engines.torch_engine import TorchEngine
    from mmemb.train.step import compute_step

    train: dict[str, Any] = {"steps": 100_000, "batch_size": len(triples), "negatives": 1,
                             "lr": 1e-5, "warmup_steps": 0, "grad_clip": None,
                             "weight_decay": 0.0}
    if chunk is not None:
        train["grad_cache"] = {"query_chunk": chunk, "candidate_chunk": chunk}
    loaded = load_recipe(raw={
        "output_dir": "unused",
        "data": {"train": [{"shards": "unused"}]},
        "model": {"backbone": {"name": "hf_text", "path": str(path)}, "pooler": "cls"},
        # sentence-transformers masks no duplicate positives; these texts are distinct anyway
        "loss": {"temperature": 0.05, "reweighter": "none", "mask_duplicate_positives": False},
        "train": train,
    }, check_components=False)
    r = loaded.recipe
    encoder = plugins.build("backbone", "hf_text", path=str(path))
    from mmemb.model import Encoder

    model = Encoder(encoder, plugins.build("pooler", "cls")).to(device).train()
    engine = TorchEngine(EngineSetup(loaded, model, DistEnv(0, 1, 0), torch.device(device)))
    samples = [Sample(id=str(i), dataset="bench", query=Item(text=q), pos=Item(text=p),
                      negs=[Item(text=n)]) for i, (q, p, n) in enumerate(triples)]
    collate = Collator(model.processor, num_negatives=1)
    loss_fn = build_loss(r.loss.spec())

    def step() -> float:
        batch = collate(samples).to(device)  # tokenization is part of the step, as for ST
        out = compute_step(engine, batch, loss_fn, r.train, check_loss=lambda loss: None)
        engine.step()
        return float(out.loss)

    return step, model


def _sentence_transformers(path: Path, triples: list[tuple[str, str, str]], chunk: int | None,
                           hidden: int, device: str) -> tuple[Callable[[], float], Any]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = SentenceTransformer(
        modules=[Transformer(str(path), max_seq_length=128), Pooling(hidden, "cls")],
        device=device,
    ).train()
    loss_fn: torch.nn.Module = (
        MultipleNegativesRankingLoss(model, scale=20.0) if chunk is None
        else CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    columns = [list(c) for c in zip(*triples, strict=True)]

    def step() -> float:
        features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in model.preprocess(inputs=col).items()} for col in columns]
        loss = loss_fn(features, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16, help="GradCache chunk / mini-batch")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sentence_transformers
    from mmemb_hf.tiny import make_tiny_text_model

    triples = _triples(args.batch)
    with tempfile.TemporaryDirectory(prefix="mmemb-bench-st-") as tmp:
        path = make_tiny_text_model(Path(tmp) / "bert", arch="bert", hidden_size=args.hidden,
                                    num_layers=args.layers, seed=0)
        variants: dict[str, Callable[[], float]] = {}
        for label, chunk in (("plain", None), ("gradcache", args.chunk)):
            torch.manual_seed(0)
            variants[f"mmemb/{label}"] = _mmemb(path, triples, chunk, args.device)[0]
            torch.manual_seed(0)
            variants[f"st/{label}"] = _sentence_transformers(path, triples, chunk, args.hidden,
                                                             args.device)[0]
        print(f"{args.batch} queries x (1 positive + 1 hard negative), BERT {args.hidden}d x "
              f"{args.layers} layers, GradCache chunk {args.chunk}, {args.device}, "
              f"{args.threads} threads, sentence-transformers {sentence_transformers.__version__}, "
              f"torch {torch.__version__}, {platform.machine()}")
        first = {name: fn() for name, fn in variants.items()}  # also the warm-up
        for label in ("plain", "gradcache"):
            print(f"first-step loss, {label}: mmemb {first[f'mmemb/{label}']:.6f}  "
                  f"sentence-transformers {first[f'st/{label}']:.6f}")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.steps):
            for name, fn in variants.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        print("\nvariant              queries/s (median)   time vs sentence-transformers")
        for name, values in times.items():
            med = statistics.median(values)
            peer = statistics.median(times["st/" + name.split("/")[1]])
            print(f"{name:<20} {args.batch / med:>18.1f}   {med / peer:>10.3f}x")


if __name__ == "__main__":
    main()

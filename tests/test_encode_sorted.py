"""Length-sorted batching (`mmemb.batching`) in `encode`, `eval` and `mine`: the same rows in the
same order as encoding in input order, with less padding."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from mmemb_hf.tiny import make_tiny_text_model

from mmemb import plugins
from mmemb.batching import encode_sorted, length_order
from mmemb.data.schema import Item, Sample
from mmemb.embed_file import encode_items
from mmemb.encoder_io import save_encoder
from mmemb.eval.dataset_embeddings import DatasetCollector, make_encode_fn
from mmemb.model import Encoder, Side
from mmemb.testing.corpus import caption_corpus

pytestmark = pytest.mark.only_plugins("mmemb_hf")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    path = make_tiny_text_model(tmp_path_factory.mktemp("bert"), seed=3)
    return Encoder(plugins.build("backbone", "hf_text", path=str(path)),
                   plugins.build("pooler", "mean"))


def _texts(n: int, seed: int = 0) -> list[Item]:
    """Texts of 1 to 12 corpus lines: lengths vary ~30x, in shuffled order."""
    rng = random.Random(seed)
    lines = caption_corpus(200, seed=seed)
    return [Item(text=" ".join(rng.sample(lines, rng.randint(1, 12)))) for _ in range(n)]


def _padded_tokens(encoder: Encoder, items: Sequence[Item], order: list[int], bs: int) -> int:
    total = 0
    for a in range(0, len(order), bs):
        batch = encoder.processor([items[i] for i in order[a : a + bs]], side="query")
        total += int(batch["input_ids"].numel())
    return total


def test_encode_sorted_equals_input_order_with_less_padding(encoder: Encoder) -> None:
    items = _texts(50)
    plain = encoder.encode(items, side="query", batch_size=8)
    seen: list[int] = []
    got = encode_sorted(encoder, items, side="query", batch_size=8, progress=seen.append)
    assert got.shape == plain.shape and sum(seen) == 50 and len(seen) == 7
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    order = length_order(items)
    assert order != list(range(50))  # the test data really is reordered
    lengths = [len(items[i].text or "") for i in order]
    assert lengths == sorted(lengths, reverse=True)
    sorted_tokens = _padded_tokens(encoder, items, order, 8)
    assert sorted_tokens < 0.8 * _padded_tokens(encoder, items, list(range(50)), 8)


def test_length_order_is_stable_and_puts_images_first() -> None:
    items = [Item(text="bb"), Item(text="a", image=b"x"), Item(text="cc"), Item(image=b"y"),
             Item(text="dd", instruction="q: ")]
    # images first (longest text first among them), then text by length, ties in input order
    assert length_order(items) == [1, 3, 4, 0, 2]


def test_encode_command_writes_input_order(encoder: Encoder, tmp_path: Path) -> None:
    model = save_encoder(encoder, tmp_path / "model",
                         backbone={"name": "hf_text", "path": "x"}, pooler={"name": "mean"})
    items = _texts(70, seed=1)
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"text": it.text}) + "\n" for it in items))
    out = tmp_path / "emb.npy"
    with src.open() as fh:
        # batch 4 -> windows of 64 items: the second window is partial
        assert encode_items(model, fh, out, batch_size=4, source=str(src)) == 70
    expected = encoder.encode(items, side="query", batch_size=4).numpy()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stream", [True, False])
def test_eval_collector_rows_match_input_order(encoder: Encoder, stream: bool) -> None:
    texts = _texts(60, seed=2)
    samples = [Sample(id=str(i), dataset="d", query=texts[i],
                      pos=texts[(i + 1) % 60], negs=[texts[(i + 7) % 60]]) for i in range(40)]
    calls: list[list[int]] = []
    inner = make_encode_fn(encoder, batch_size=4, precision="fp32")

    def spy(batch: Sequence[Item], side: Side) -> np.ndarray:
        calls.append([len(it.text or "") for it in batch])
        return inner(batch, side)

    col = DatasetCollector("d", spy, batch_size=4, stream=stream, sort_window=3)
    for s in samples:
        col.add(s)
    if not stream:
        col.encode_pending()
    enc = col.finish()
    assert enc is not None and all(len(c) <= 4 for c in calls)
    # every batch is length-sorted, and the rows are where the input order puts them
    assert all(c == sorted(c, reverse=True) for c in calls)
    q = encoder.encode([s.query for s in samples], side="query", batch_size=4).numpy()
    np.testing.assert_allclose(enc.queries[enc.query_index], q, atol=1e-5, rtol=0)
    t = encoder.encode([s.pos for s in samples], side="target", batch_size=4).numpy()
    np.testing.assert_allclose(enc.targets[enc.positives], t, atol=1e-5, rtol=0)

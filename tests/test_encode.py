"""`mmemb encode`: items streamed a batch at a time to .npy or .parquet, in input order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mmemb_hf.tiny import make_tiny_llava_onevision

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.embed_file import encode_items
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import DataError
from mmemb.model import Encoder
from mmemb.testing import shape_png

pytestmark = pytest.mark.only_plugins("mmemb_hf")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = make_tiny_llava_onevision(tmp_path_factory.mktemp("tiny"), weights=True, seed=0)
    spec = {"name": "llava_onevision", "path": str(tiny)}
    encoder = Encoder(plugins.build("backbone", "llava_onevision", path=str(tiny)),
                      plugins.build("pooler", "last_token"))
    return save_encoder(encoder, tmp_path_factory.mktemp("enc") / "model", backbone=spec,
                        pooler={"name": "last_token"})


@pytest.fixture(scope="module")
def items_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("items")
    (root / "red.png").write_bytes(shape_png("red", "circle"))
    rows = [
        {"text": "a red circle", "id": "a"},
        {"image": "red.png"},
        {"text": "what shape?", "image": "red.png", "instruction": "Represent the image:"},
        {"text": "green"},
        {"text": "a blue square", "id": 7},
    ]
    path = root / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _expected(model_dir: Path, items_file: Path) -> np.ndarray:
    png = (items_file.parent / "red.png").read_bytes()
    items = [Item(text="a red circle"), Item(image=png),
             Item(text="what shape?", image=png, instruction="Represent the image:"),
             Item(text="green"), Item(text="a blue square")]
    return load_encoder(model_dir).encode(items, side="query", batch_size=8).numpy()


def _encode(model_dir: Path, items_file: Path, out: Path, batch_size: int = 2) -> int:
    with items_file.open() as fh:
        return encode_items(model_dir, fh, out, batch_size=batch_size, source=str(items_file),
                            image_root=items_file.parent)


def test_npy_rows_in_input_order_across_batches(model_dir: Path, items_file: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "sub" / "emb.npy"
    assert _encode(model_dir, items_file, out) == 5
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape[0] == 5
    np.testing.assert_allclose(got, _expected(model_dir, items_file), rtol=1e-5, atol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["emb.npy"]  # no temporary left


def test_parquet_has_ids_and_the_same_embeddings(model_dir: Path, items_file: Path,
                                                 tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb.parquet"
    with items_file.open() as fh:  # a window of one batch: two windows for five items
        encode_items(model_dir, fh, out, batch_size=3, source=str(items_file),
                     image_root=items_file.parent, sort_window=1)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["a", "2", "3", "4", "7"]
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(emb, _expected(model_dir, items_file), rtol=1e-5, atol=1e-6)
    assert pq.read_metadata(out).num_row_groups == 2  # written a window at a time


def test_unknown_format_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--out .*emb\.csv.*\*\.npy or \*\.parquet"):
        encode_items(tmp_path / "no-model", ["{}"], tmp_path / "emb.csv")


def test_a_bad_line_leaves_no_output(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    lines = ['{"text": "fine"}'] * 3 + ['{"txt": "typo"}']
    with pytest.raises(DataError, match=r"items\.jsonl:4: unknown field"):
        encode_items(model_dir, lines, out, batch_size=2, source="items.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_no_items_give_empty_outputs_of_the_right_width(model_dir: Path, tmp_path: Path) -> None:
    width = load_encoder(model_dir).backbone.hidden_size
    encode_items(model_dir, [], tmp_path / "e.npy")
    assert np.load(tmp_path / "e.npy").shape == (0, width)
    pq = pytest.importorskip("pyarrow.parquet")
    encode_items(model_dir, [], tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and table.schema.field("embedding").type.list_size == width

"""The source contract (`mmemb.testing.contracts.check_source`) on every built-in source, each
with a small input holding good rows and one bad row of each kind it can meet; and the contract
catching a source that breaks it."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

import mmemb
from mmemb import plugins
from mmemb.data.schema import Item, Sample
from mmemb.data.sources import Record, Reject, Source
from mmemb.data.testing import jpeg_bytes, png_bytes
from mmemb.testing.contracts import check_source


class _Rows(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 4


class _Dropping(Source):
    """Breaks conservation: the last row vanishes without a Reject."""

    def __init__(self, config: _Rows) -> None:
        self.n = config.n

    def __iter__(self) -> Iterator[Record]:
        for i in range(self.n - 1):
            yield Sample(id=f"s{i}", dataset="d", query=Item(text=f"q{i}"), pos=Item(text="p"))


class _Shuffling(_Dropping):
    """Breaks determinism: every read yields the rows in another order."""

    def __iter__(self) -> Iterator[Record]:
        order = list(range(self.n))
        random.shuffle(order)
        for i in order:
            yield Sample(id=f"s{i}", dataset="d", query=Item(text=f"q{i}"), pos=Item(text="p"))


class _Rejecting(_Dropping):
    """Counts honestly: one Reject for the last row."""

    def __iter__(self) -> Iterator[Record]:
        yield from super().__iter__()
        yield Reject("missing_field", "rows", self.n, "no pos")


class BrokenSources:
    @mmemb.hookimpl
    def mmemb_register_sources(self, registry: plugins.Registrar) -> None:
        registry.add("dropping", _Dropping, config=_Rows)
        registry.add("shuffling", _Shuffling, config=_Rows)
        registry.add("rejecting", _Rejecting, config=_Rows)


pytestmark = pytest.mark.only_plugins("mmemb_sources", BrokenSources())


def _write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
    return root


def _lines(rows: list[Any]) -> str:
    """JSON lines; a str row is written as it is (a line that is not JSON)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def mmeb_train(tmp: Path) -> tuple[dict[str, Any], int, dict[str, int]]:
    root = _write(tmp / "MMEB-train", {
        "images/q0.jpg": jpeg_bytes(0), "images/p1.png": png_bytes(1),
        "images/n1.jpg": jpeg_bytes(2), "images/bad.jpg": b"\xff\xd8\xff garbage",
        "CIRR/original-00000-of-00001.jsonl": _lines([
            {"qry": "<|image_1|>\nWhat is it?", "qry_image_path": "images/q0.jpg",
             "pos_text": "A dog.", "neg_text": "A cat."},
            {"qry": "a red car", "pos_text": "<|image_1|>", "pos_image_path": "images/p1.png",
             "neg_text": "<|image_1|>", "neg_image_path": "images/n1.jpg"},
            {"qry": "<|image_1|> what?", "qry_image_path": "", "pos_text": "x"},  # no image
            {"qry": "q", "pos_text": "p", "neg_text": ["a", ""],
             "neg_image_path": ["", "gone.jpg"]},
            {"qry": "q", "pos_text": "<|image_1|>", "pos_image_path": "images/bad.jpg"},
            {"qry": "   ", "pos_text": "p"},
            "{not json",
        ]),
    })
    args = {"input": str(root / "CIRR" / "original-00000-of-00001.jsonl"),
            "image_root": str(root)}
    return args, 7, {"missing_field": 1, "missing_image": 1, "corrupt_image": 1,
                     "empty_text": 1, "bad_row": 1}


def mmeb_eval(tmp: Path) -> tuple[dict[str, Any], int, dict[str, int]]:
    root = _write(tmp, {"c0.png": png_bytes(10), "c1.png": png_bytes(11), "q.jpg": jpeg_bytes(5),
                        "MSCOCO_t2i/test-00000-of-00001.jsonl": _lines([
                            {"qry_text": "a cat", "qry_img_path": "",
                             "tgt_text": ["<|image_1|>", "<|image_1|>"],
                             "tgt_img_path": ["c0.png", "c1.png"]},
                            {"qry_text": "<|image_1|>\nclassify", "qry_img_path": "q.jpg",
                             "tgt_text": ["tench", "goldfish"], "tgt_img_path": []},
                            {"qry_text": "q", "tgt_text": ["a", "b"], "tgt_img_path": ["x.png"]},
                        ])})
    return ({"input": str(root / "MSCOCO_t2i" / "test-00000-of-00001.jsonl"),
             "image_root": str(root)}, 3, {"missing_field": 1})


def jsonl(tmp: Path) -> tuple[dict[str, Any], int, dict[str, int]]:
    root = _write(tmp, {"pics/dog.jpg": jpeg_bytes(1), "pics/cat.png": png_bytes(2),
                        "pairs.jsonl": _lines([
                            {"id": "x1", "query": "a dog", "pos": {"image": "pics/dog.jpg"},
                             "neg": {"image": "pics/cat.png"}},
                            {"query": {"text": "q2", "instruction": "Mine."}, "pos": "p2",
                             "negs": ["n1", "n2"], "dataset": "other"},
                            {"id": "x1", "query": "again", "pos": "p"},
                            {"query": "no positive"},
                            {"query": "q", "pos": {"image": "pics/missing.jpg"}},
                            "[1, 2]",
                        ])})
    return ({"input": str(root / "pairs.jsonl"), "query_instruction": "Find it."}, 6,
            {"duplicate_id": 1, "missing_field": 1, "missing_image": 1, "bad_row": 1})


def image_folder(tmp: Path) -> tuple[dict[str, Any], int, dict[str, int]]:
    files: dict[str, bytes | str] = {}
    for c, cls in enumerate(["golden_retriever", "tabby_cat", "zebra"]):
        files[f"{cls}/a.jpg"] = jpeg_bytes(c)
        files[f"{cls}/sub/b.png"] = png_bytes(c)
    files["zebra/notes.txt"] = "not an image: ignored by extension"
    files["zebra/broken.jpg"] = b"\xff\xd8\xff garbage"
    root = _write(tmp / "pets", files)
    return {"input": str(root), "negatives": 1}, 7, {"corrupt_image": 1}


def synthetic(tmp: Path) -> tuple[dict[str, Any], int, dict[str, int]]:
    return {"n": 6, "seed": 3, "image_size": 32, "negatives": 2}, 6, {}


INPUTS: dict[str, Callable[[Path], tuple[dict[str, Any], int, dict[str, int]]]] = {
    "mmeb_train": mmeb_train, "mmeb_eval": mmeb_eval, "jsonl": jsonl,
    "image_folder": image_folder, "synthetic": synthetic,
}


def test_every_built_in_source_has_a_contract_case() -> None:
    assert sorted(INPUTS) == sorted(n for n in plugins.available("source")
                                    if plugins.get("source", n).provider == "mmemb_sources")


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_source_contract(name: str, tmp_path: Path) -> None:
    args, rows, rejects = INPUTS[name](tmp_path / "in")
    report = check_source(name, args, rows=rows, rejects=rejects, directory=tmp_path / "out")
    assert report.written == rows - sum(rejects.values())


def test_an_honest_source_with_rejects_passes(tmp_path: Path) -> None:
    check_source("rejecting", {"n": 4}, rows=4, rejects={"missing_field": 1},
                 directory=tmp_path)


@pytest.mark.parametrize("name,rows,rejects,match", [
    ("dropping", 4, None, "silent drop"),
    ("shuffling", 4, None, "second read"),
    ("rejecting", 4, {"missing_field": 2}, "expected"),
])
def test_the_contract_catches(name: str, rows: int, rejects: dict[str, int] | None, match: str,
                              tmp_path: Path) -> None:
    random.seed(0)  # the shuffling source's two reads differ for this seed
    with pytest.raises(AssertionError, match=match):
        check_source(name, {"n": rows}, rows=rows, rejects=rejects, directory=tmp_path)

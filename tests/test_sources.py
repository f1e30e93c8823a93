"""Each source on small files made here (real JPEG/PNG bytes), through prepare and back."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmemb import plugins
from mmemb.data.prepare import prepare
from mmemb.data.schema import Sample
from mmemb.data.shards import iter_samples, read_manifest
from mmemb.data.stream import TrainStream
from mmemb.data.testing import jpeg_bytes, png_bytes
from mmemb.errors import DataError


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _images(root: Path, names: dict[str, bytes]) -> Path:
    for name, data in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ----------------------------------------------------------------------------- mmeb_train

MMEB_TRAIN_ROWS = [
    {
        "qry": "<|image_1|>\nRepresent the given image with the following question: What is it?",
        "qry_image_path": "images/q0.jpg",
        "pos_text": "A dog.",
        "pos_image_path": "",
        "neg_text": "A cat.",
        "neg_image_path": "",
    },
    {
        "qry": "Find an image that matches: a red car",
        "qry_image_path": "",
        "pos_text": "<|image_1|>\nRepresent the given image.",
        "pos_image_path": "images/p1.png",
        "neg_text": "<|image_1|>\nRepresent the given image.",
        "neg_image_path": "images/n1.jpg",
    },
    {
        "qry": "<|image_1|>\nRetrieve a modified image: make it blue",
        "qry_image_path": "images/q0.jpg",
        "pos_text": "<|image_1|>",
        "pos_image_path": "images/p1.png",
    },
]


def _mmeb_train_files(tmp_path: Path) -> tuple[Path, Path]:
    root = _images(
        tmp_path / "MMEB-train",
        {
            "images/q0.jpg": jpeg_bytes(0),
            "images/p1.png": png_bytes(1),
            "images/n1.jpg": jpeg_bytes(2),
        },
    )
    return _jsonl(root / "CIRR" / "original-00000-of-00001.jsonl", MMEB_TRAIN_ROWS), root


def test_mmeb_train_rows(tmp_path: Path) -> None:
    src, root = _mmeb_train_files(tmp_path)
    report = prepare("mmeb_train", {"input": str(src), "image_root": str(root)}, tmp_path / "o")
    assert (report.read, report.written, report.datasets) == (3, 3, {"CIRR": 3})
    s0, s1, s2 = iter_samples(tmp_path / "o")
    assert s0.query.image == (root / "images/q0.jpg").read_bytes()  # original bytes, no re-encode
    # only the marker goes; the rest is verbatim, the newline VLM2Vec puts after it included
    assert s0.query.text == "\nRepresent the given image with the following question: What is it?"
    assert (s0.pos.text, s0.pos.image) == ("A dog.", None)
    assert [n.text for n in s0.negs] == ["A cat."]
    assert s1.query.image is None and s1.query.text == "Find an image that matches: a red car"
    assert s1.pos.text == "\nRepresent the given image." and s1.pos.image == png_bytes(1)
    assert s1.negs[0].image == jpeg_bytes(2)
    assert s2.pos.text is None and s2.pos.image == png_bytes(1)  # marker only -> image only
    assert s2.negs == []
    assert s0.id == "CIRR/original-00000-of-00001:1" and s0.meta["origin"]["line"] == 1


def test_mmeb_train_parquet_matches_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src, root = _mmeb_train_files(tmp_path)
    rows = [
        {
            k: r.get(k, "")
            for k in (
                "qry",
                "qry_image_path",
                "pos_text",
                "pos_image_path",
                "neg_text",
                "neg_image_path",
            )
        }
        for r in MMEB_TRAIN_ROWS
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "CIRR" / "original-00000-of-00001.parquet")
    args = {"image_root": str(root)}
    prepare("mmeb_train", {**args, "input": str(src)}, tmp_path / "j")
    prepare(
        "mmeb_train",
        {**args, "input": str(root / "CIRR" / "original-00000-of-00001.parquet")},
        tmp_path / "p",
    )
    j, p = list(iter_samples(tmp_path / "j")), list(iter_samples(tmp_path / "p"))
    for a, b in zip(j, p, strict=True):
        assert (a.query, a.pos, a.negs, a.dataset, a.id) == (
            b.query,
            b.pos,
            b.negs,
            b.dataset,
            b.id,
        )


def test_mmeb_train_rejects(tmp_path: Path) -> None:
    _images(tmp_path, {"ok.jpg": jpeg_bytes(0)})
    src = _jsonl(
        tmp_path / "set.jsonl",
        [
            {"qry": "<|image_1|> what?", "qry_image_path": "", "pos_text": "x"},  # marker, no image
            {"qry": "q", "pos_image_path": "ok.jpg"},  # no pos_text
            {
                "qry": "q",
                "pos_text": "p",
                "neg_text": ["a", ""],
                "neg_image_path": ["", "gone.jpg"],
            },
            {"qry": 5, "pos_text": "p"},  # not text
            {"qry": "q", "pos_text": "p", "neg_text": ["n1", "n2"]},  # fine
        ],
    )
    report = prepare("mmeb_train", {"input": str(src)}, tmp_path / "o", on_error="skip")
    assert report.rejected == {"missing_field": 3, "missing_image": 1}
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").open()]
    assert "marker" in rejects[0]["detail"] and "qry_image_path" in rejects[0]["detail"]
    assert "neg_image_path[1]" in rejects[2]["detail"]
    assert [n.text for n in next(iter(iter_samples(tmp_path / "o"))).negs] == ["n1", "n2"]


# ----------------------------------------------------------------------------- mmeb_eval


def test_mmeb_eval_keeps_each_query_candidate_list(tmp_path: Path) -> None:
    cands = {f"c{i}.png": png_bytes(10 + i) for i in range(4)}
    root = _images(tmp_path / "eval_images", {"q.jpg": jpeg_bytes(5), **cands})
    names = list(cands)
    src = _jsonl(
        tmp_path / "MSCOCO_t2i" / "test-00000-of-00001.jsonl",
        [
            {
                "qry_text": "Find me an everyday image that matches the given caption: a cat",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 4,
                "tgt_img_path": names,
            },
            {
                "qry_text": "Find me an everyday image that matches the given caption: a dog",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
                "tgt_img_path": [names[2], names[0], names[3]],
            },
            {
                "qry_text": "<|image_1|>\nRepresent the given image for classification",
                "qry_img_path": "q.jpg",
                "tgt_text": ["tench", "goldfish", "shark"],
                "tgt_img_path": [],
            },
        ],
    )
    report = prepare("mmeb_eval", {"input": str(src), "image_root": str(root)}, tmp_path / "o")
    assert report.written == 3
    manifest = read_manifest(tmp_path / "o")
    assert manifest["kind"] == "eval"
    pool = [s for s in manifest["shards"] if s.get("pool")]
    assert pool[0]["images"] == 5  # 4 candidates + the query image, each stored once
    a, b, c = iter_samples(tmp_path / "o")
    assert a.dataset == "MSCOCO_t2i"
    assert [x.image for x in a.candidates] == [cands[n] for n in names]
    assert [x.image for x in b.candidates] == [cands[names[2]], cands[names[0]], cands[names[3]]]
    assert a.pos.text == "\nRepresent the given image."
    assert [x.text for x in c.candidates] == ["tench", "goldfish", "shark"]
    assert c.query.image == jpeg_bytes(5) and c.meta["candidates"] == 3
    with pytest.raises(DataError, match="data.eval"):
        TrainStream([(tmp_path / "o", 1.0)], batch_size=1)


def test_mmeb_eval_rejects_mismatched_lists(tmp_path: Path) -> None:
    src = _jsonl(
        tmp_path / "x.jsonl",
        [
            {"qry_text": "q", "tgt_text": ["a", "b"], "tgt_img_path": ["x.png"]},
            {"qry_text": "q", "tgt_text": []},
        ],
    )
    report = prepare("mmeb_eval", {"input": str(src)}, tmp_path / "o", on_error="skip")
    assert report.rejected == {"missing_field": 2}


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_items_instructions_datasets_meta(tmp_path: Path) -> None:
    _images(tmp_path, {"pics/dog.jpg": jpeg_bytes(1), "pics/cat.png": png_bytes(2)})
    src = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "id": "x1",
                "query": "a dog",
                "pos": {"image": "pics/dog.jpg"},
                "neg": {"image": "pics/cat.png", "instruction": "Own."},
                "meta": {"split": "a"},
            },
            {
                "query": {"text": "q2", "instruction": "Mine."},
                "pos": "p2",
                "negs": ["n1", "n2"],
                "dataset": "other",
            },
        ],
    )
    prepare(
        "jsonl",
        {"input": str(src), "query_instruction": "Find it.", "target_instruction": "Represent it."},
        tmp_path / "o",
    )
    by_id = {s.id: s for s in iter_samples(tmp_path / "o")}
    x1, x2 = by_id["x1"], by_id["pairs:2"]
    assert x1.dataset == "pairs" and x2.dataset == "other"
    assert (x1.query.text, x1.query.instruction) == ("a dog", "Find it.")
    assert (x1.pos.image, x1.pos.instruction) == (jpeg_bytes(1), "Represent it.")
    assert (x1.negs[0].image, x1.negs[0].instruction) == (png_bytes(2), "Own.")
    assert x1.meta["split"] == "a" and x1.meta["origin"]["line"] == 1
    assert x2.query.instruction == "Mine." and [n.text for n in x2.negs] == ["n1", "n2"]


# ----------------------------------------------------------------------------- image_folder


def _tree(root: Path) -> Path:
    files = {}
    for c, cls in enumerate(["golden_retriever", "tabby_cat", "zebra"]):
        files[f"{cls}/a.jpg"] = jpeg_bytes(c)
        files[f"{cls}/sub/b.png"] = png_bytes(c)
    files["zebra/notes.txt"] = b"not an image: ignored by extension"
    return _images(root, files)


def test_image_folder_train_and_eval(tmp_path: Path) -> None:
    root = _tree(tmp_path / "pets")
    report = prepare(
        "image_folder",
        {"input": str(root), "negatives": 1, "label_template": "a photo of a {label}"},
        tmp_path / "t",
    )
    assert report.written == 6 and report.datasets == {"pets": 6}
    samples = list(iter_samples(tmp_path / "t"))
    first = next(s for s in samples if s.id == "golden_retriever/a.jpg")
    assert first.query.image == jpeg_bytes(0)
    assert first.query.instruction == "Represent the given image for classification."
    assert first.pos.text == "a photo of a golden retriever"
    assert len(first.negs) == 1 and first.negs[0].text != first.pos.text
    again = list(iter_samples(tmp_path / "t"))
    assert again == samples  # reading is exact; and preparing again gives the same negatives:
    prepare(
        "image_folder",
        {"input": str(root), "negatives": 1, "label_template": "a photo of a {label}"},
        tmp_path / "t2",
    )
    assert [s.negs for s in iter_samples(tmp_path / "t2")] == [s.negs for s in samples]

    prepare(
        "image_folder", {"input": str(root), "negatives": "all", "kind": "eval"}, tmp_path / "e"
    )
    assert read_manifest(tmp_path / "e")["kind"] == "eval"
    zebra = [s for s in iter_samples(tmp_path / "e") if s.meta["label"] == "zebra"][0]
    assert [c.text for c in zebra.candidates] == ["zebra", "golden retriever", "tabby cat"]


def test_image_folder_writes_classes_interleaved(tmp_path: Path) -> None:
    """Class-sorted shards defeat the training stream's shuffle buffer, so the writer shuffles."""
    classes = ["ant", "bee", "cat", "dog"]
    root = _images(
        tmp_path / "tree",
        {f"{cls}/{i:02d}.png": png_bytes(c) for c, cls in enumerate(classes) for i in range(12)},
    )
    sorted_ids = [f"{cls}/{i:02d}.png" for cls in classes for i in range(12)]

    def ids(out: str, **args: object) -> list[str]:
        prepare("image_folder", {"input": str(root), **args}, tmp_path / out)
        return [s.id for s in iter_samples(tmp_path / out)]

    shuffled = ids("a")
    assert sorted(shuffled) == sorted_ids and shuffled != sorted_ids
    labels = [i.split("/")[0] for i in shuffled]
    changes = sum(a != b for a, b in zip(labels, labels[1:], strict=False))
    assert changes > 3 * len(classes)  # classes interleaved, not in blocks
    assert ids("b") == shuffled  # seeded: preparing again gives the same shards
    assert ids("c", seed=1) != shuffled
    assert ids("d", shuffle=False) == sorted_ids


def test_image_folder_corrupt_image_and_bad_args(tmp_path: Path) -> None:
    root = _tree(tmp_path / "pets")
    (root / "zebra" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    report = prepare("image_folder", {"input": str(root)}, tmp_path / "o", on_error="skip")
    assert (report.written, report.rejected) == (6, {"corrupt_image": 1})
    with pytest.raises(DataError, match="only 3 classes"):
        prepare("image_folder", {"input": str(root), "negatives": 5}, tmp_path / "x")
    with pytest.raises(DataError, match="no such folder"):
        prepare("image_folder", {"input": str(tmp_path / "nope")}, tmp_path / "x")


# ----------------------------------------------------------------------------- synthetic

_CAPTION = re.compile(
    r"^a (?P<color0>\w+) (?P<shape0>\w+) (?:(?P<relation>above|below|left of|right of) "
    r"a (?P<color1>\w+) (?P<shape1>\w+)|(?:on the|at the) (?P<position>\w+))$"
)


def parse_caption(text: str) -> dict[str, str]:
    m = _CAPTION.match(text)
    assert m, text
    return {k: v for k, v in m.groupdict().items() if v is not None}


def read_scene(png: bytes) -> dict[str, str]:
    """The scene from the pixels: colours present, shapes by fill ratio, layout by centroid."""
    from mmemb_sources.synthetic import COLORS

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    size = arr.shape[0]
    found = []
    for name, rgb in COLORS.items():
        mask = np.abs(arr - np.array(rgb)).max(axis=2) < 12
        if mask.sum() < 20:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        found.append((name, shape, xs.mean(), ys.mean()))
    if len(found) == 1:
        name, shape, x, y = found[0]
        dx, dy = x - size / 2, y - size / 2
        pos = (
            ("left" if dx < 0 else "right")
            if abs(dx) > abs(dy)
            else ("top" if dy < 0 else "bottom")
        )
        return {"color0": name, "shape0": shape, "position": pos}
    assert len(found) == 2, found
    return {
        "colors": ",".join(sorted(f[0] for f in found)),
        **{f"{f[0]}": f"{f[1]}@{f[2]:.0f},{f[3]:.0f}" for f in found},
    }


def scene_matches_image(scene: dict[str, str], png: bytes) -> bool:
    got = read_scene(png)
    if "position" in scene:
        return got == scene
    if got.get("colors") != ",".join(sorted([scene["color0"], scene["color1"]])):
        return False
    s0, p0 = got[scene["color0"]].split("@")
    s1, p1 = got[scene["color1"]].split("@")
    (x0, y0), (x1, y1) = (map(float, p0.split(",")), map(float, p1.split(",")))
    if abs(y1 - y0) > abs(x1 - x0):
        relation = "above" if y0 < y1 else "below"
    else:
        relation = "left of" if x0 < x1 else "right of"
    return (s0, s1, relation) == (scene["shape0"], scene["shape1"], scene["relation"])


def _synthetic(**kw: Any) -> list[Sample]:
    source = plugins.build("source", "synthetic", **kw)
    return list(source)


def test_synthetic_negatives_differ_in_exactly_one_attribute() -> None:
    samples = _synthetic(n=80, seed=3, negatives=3)
    for s in samples:
        scene = s.meta["scene"]
        for changed, neg_scene in zip(s.meta["neg_changes"], s.meta["neg_scenes"], strict=True):
            diff = [k for k in scene if scene[k] != neg_scene[k]]
            assert diff == [changed]
        assert len({json.dumps(n, sort_keys=True) for n in s.meta["neg_scenes"]}) == 3
        assert len(set(s.meta["neg_changes"])) == 3  # three different attributes
        if s.meta["task"] == "i2t":  # the captions say so too
            pos = parse_caption(s.pos.text or "")
            assert pos == scene and s.query.image is not None
            for neg in s.negs:
                got = parse_caption(neg.text or "")
                assert sum(got[k] != pos[k] for k in pos) == 1
        else:  # and the pixels: each image shows exactly its scene
            assert parse_caption(s.query.text or "") == scene
            assert s.pos.image is not None and scene_matches_image(scene, s.pos.image)
            for neg, neg_scene in zip(s.negs, s.meta["neg_scenes"], strict=True):
                assert neg.image is not None and scene_matches_image(neg_scene, neg.image)
                assert not scene_matches_image(scene, neg.image)


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    a, b = _synthetic(n=10, seed=1), _synthetic(n=10, seed=1)
    assert a == b
    assert _synthetic(n=4, seed=1) == a[:4]  # a smaller n is a prefix
    other_seed, other_split = _synthetic(n=10, seed=2), _synthetic(n=10, seed=1, split="eval")
    for other in (other_seed, other_split):
        assert all(x.query != y.query or x.pos != y.pos for x, y in zip(a, other, strict=True))
    assert {s.id for s in a}.isdisjoint(s.id for s in other_split)


def test_synthetic_tasks_and_items() -> None:
    samples = _synthetic(n=6, seed=0, negatives=2, image_size=48)
    assert [s.dataset for s in samples] == ["synthetic_t2i", "synthetic_i2t"] * 3
    t2i, i2t = samples[0], samples[1]
    assert t2i.query.instruction == "Find an image that matches the given caption."
    assert t2i.query.image is None and all(n.image and n.text is None for n in t2i.negs)
    assert i2t.query.text is None and i2t.query.image is not None
    assert i2t.query.instruction == "Find a caption that describes the given image."
    assert Image.open(io.BytesIO(i2t.query.image)).size == (48, 48)
    assert i2t.query.image.startswith(b"\x89PNG") and len(t2i.negs) == 2
    only_one = _synthetic(n=30, max_objects=1, tasks=["i2t"])
    assert all("position" in s.meta["scene"] for s in only_one)


def test_synthetic_eval_split_is_marked_eval(tmp_path: Path) -> None:
    prepare("synthetic", {"n": 4, "split": "eval"}, tmp_path / "e")
    assert read_manifest(tmp_path / "e")["kind"] == "eval"
    prepare("synthetic", {"n": 4}, tmp_path / "t")
    assert read_manifest(tmp_path / "t")["kind"] == "train"

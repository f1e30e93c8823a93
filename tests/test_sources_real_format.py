"""The MMEB sources on files laid out exactly as the real ones are.

Fixtures follow the real column layout and folder layout of TIGER-Lab/MMEB-train (hub files
``<Subset>/{original,diverse_instruction,train}-00000-of-00001.parquet`` with image paths like
``images/CIRR/Train/x.jpg`` relative to the MMEB-train folder; the hub's parquet conversion
``<Subset>/<split>/0000.parquet``), MMEB-eval v1 (``qry_text``, ``qry_img_path``, ``tgt_text``,
``tgt_img_path``) and VLM2Vec-v2 eval rows (``qry_inst`` and ``tgt_inst`` beside them). Row texts
are copied from real rows.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mmemb.data.prepare import prepare
from mmemb.data.shards import iter_samples, read_manifest
from mmemb.data.testing import jpeg_bytes, png_bytes
from mmemb.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text",
                 "neg_image_path")


def _cirr_rows(wording: str) -> list[dict[str, Any]]:
    """CIRR rows as in MMEB-train (each split words the same queries differently)."""
    return [
        {
            "qry": f"<|image_1|>\n{wording}: Many hamster together playing in a different "
            f"background {i}.\n",
            "qry_image_path": f"images/CIRR/Train/train-{i}-img1.jpg",
            "pos_text": "<|image_1|>\nRepresent the given image.\n",
            "pos_image_path": f"images/CIRR/Train/train-{i}-img0.jpg",
            "neg_text": "",
            "neg_image_path": "",
        }
        for i in range(3)
    ]


IMAGENET_ROW = {
    "qry": "<|image_1|>\nRepresent the given image for classification\n",
    "qry_image_path": "images/ImageNet_1K/Train/image_0.jpg",
    "pos_text": "plane, carpenter's plane, woodworking plane",
    "pos_image_path": "",
    "neg_text": "",
    "neg_image_path": "",
}

WORDINGS = {
    "original": "Given an image, find a similar everyday image with the described changes",
    "diverse_instruction": "Retrieve a picture like this one, changed as follows",
    "train": "Find the modified image",
}


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def mmeb_train_tree(root: Path, *, converted: bool = False) -> Path:
    """An MMEB-train folder: CIRR with three splits, ImageNet_1K with two, and the images."""
    for split, wording in WORDINGS.items():
        name = f"{split}/0000.parquet" if converted else f"{split}-00000-of-00001.parquet"
        _parquet(root / "CIRR" / name, _cirr_rows(wording))
    for split in ("original", "diverse_instruction"):
        name = f"{split}/0000.parquet" if converted else f"{split}-00000-of-00001.parquet"
        _parquet(root / "ImageNet_1K" / name, [IMAGENET_ROW])
    for i in range(3):
        _write(root / f"images/CIRR/Train/train-{i}-img1.jpg", jpeg_bytes(i))
        _write(root / f"images/CIRR/Train/train-{i}-img0.jpg", jpeg_bytes(10 + i))
    _write(root / "images/ImageNet_1K/Train/image_0.jpg", jpeg_bytes(20))
    return root


def mmeb_eval_tree(root: Path) -> Path:
    """An MMEB-eval folder (v1 rows) with its images unzipped into eval_images/."""
    _parquet(
        root / "ImageNet-1K" / "test-00000-of-00001.parquet",
        [
            {
                "qry_text": "<|image_1|> Represent the given image for classification\n",
                "qry_img_path": f"ImageNet-1K/ILSVRC2012_val_0000000{i}.JPEG",
                "tgt_text": ["tench", "goldfish", "great white shark"],
                "tgt_img_path": ["", "", ""],
            }
            for i in range(2)
        ],
    )
    for i in range(2):
        _write(root / f"eval_images/ImageNet-1K/ILSVRC2012_val_0000000{i}.JPEG", jpeg_bytes(30 + i))
    return root


# ----------------------------------------------------------------------------- verbatim text


def test_query_text_with_the_image_marker_is_kept_verbatim(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    prepare("mmeb_train", {"input": str(root / "ImageNet_1K"), "split": "original"},
            tmp_path / "o")
    (s,) = iter_samples(tmp_path / "o")
    # the marker is removed; the newline after it and the trailing newline stay, as VLM2Vec
    # feeds them (it swaps the marker for its backbone's image token in place)
    assert s.query.text == "\nRepresent the given image for classification\n"
    assert s.query.instruction is None
    assert s.pos.text == "plane, carpenter's plane, woodworking plane" and s.pos.image is None
    assert s.query.image == jpeg_bytes(20)


# ----------------------------------------------------------------------------- splits


def test_a_dataset_folder_reads_one_split_not_all_three(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    report = prepare("mmeb_train", {"input": str(root / "CIRR")}, tmp_path / "o")
    assert (report.read, report.written, report.datasets) == (3, 3, {"CIRR": 3})  # not 9
    samples = list(iter_samples(tmp_path / "o"))
    assert {s.meta["split"] for s in samples} == {"original"}  # VLM2Vec's default split
    assert all(WORDINGS["original"] in (s.query.text or "") for s in samples)
    assert samples[0].id == "CIRR/original-00000-of-00001:1"

    report = prepare("mmeb_train", {"input": str(root / "CIRR"), "split": "diverse_instruction"},
                     tmp_path / "di")
    assert report.written == 3
    samples = list(iter_samples(tmp_path / "di"))
    assert all(WORDINGS["diverse_instruction"] in (s.query.text or "") for s in samples)


def test_a_folder_without_the_default_split_names_the_splits_it_has(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    (root / "CIRR" / "original-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"CIRR comes in 2 splits \(diverse_instruction, train\)"
                       r".*--arg split=NAME"):
        prepare("mmeb_train", {"input": str(root / "CIRR")}, tmp_path / "o")
    with pytest.raises(DataError,
                       match=r"no split 'orignal' \(found: diverse_instruction, train\)"):
        prepare("mmeb_train", {"input": str(root / "CIRR"), "split": "orignal"}, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_glob_over_subsets_takes_one_split_of_each(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    report = prepare("mmeb_train", {"input": str(root / "*" / "*.parquet")}, tmp_path / "o")
    assert report.datasets == {"CIRR": 3, "ImageNet_1K": 1}
    assert {s.meta["split"] for s in iter_samples(tmp_path / "o")} == {"original"}


def test_a_named_file_of_another_split_is_an_error(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    named = root / "CIRR" / "train-00000-of-00001.parquet"
    with pytest.raises(DataError, match="holds split 'train' of CIRR, but split=original"):
        prepare("mmeb_train", {"input": str(named), "split": "original"}, tmp_path / "o")
    assert prepare("mmeb_train", {"input": str(named)}, tmp_path / "o").written == 3


# ----------------------------------------------------------------------------- hub layouts


def test_the_hubs_converted_layout_names_the_dataset_not_the_shard(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train", converted=True)
    # no --image-root: the default is MMEB-train, where the rows' images/... paths start
    report = prepare("mmeb_train", {"input": str(root / "ImageNet_1K")}, tmp_path / "o")
    assert report.datasets == {"ImageNet_1K": 1}
    (s,) = iter_samples(tmp_path / "o")
    assert s.dataset == "ImageNet_1K" and s.id == "ImageNet_1K/original/0000:1"
    assert s.meta["split"] == "original" and s.query.image == jpeg_bytes(20)

    report = prepare("mmeb_train", {"input": str(root / "CIRR"), "split": "train"}, tmp_path / "c")
    assert report.datasets == {"CIRR": 3}
    assert read_manifest(tmp_path / "c")["rejected"] == {}


def test_default_image_root_is_right_for_the_hub_layout(tmp_path: Path) -> None:
    root = mmeb_train_tree(tmp_path / "MMEB-train")
    src = root / "CIRR" / "original-00000-of-00001.parquet"
    report = prepare("mmeb_train", {"input": str(src)}, tmp_path / "o")  # no image_root
    assert (report.written, report.rejected) == (3, {})
    s = next(iter(iter_samples(tmp_path / "o")))
    assert s.query.image == jpeg_bytes(0) and s.pos.image == jpeg_bytes(10)
    # when an image is missing, the message says which default was used and why
    (root / "images/CIRR/Train/train-0-img1.jpg").unlink()
    with pytest.raises(DataError) as err:
        prepare("mmeb_train", {"input": str(src)}, tmp_path / "o2")
    message = str(err.value)
    assert f"the default image root is {root}" in message and "folder above" in message


def test_a_lone_file_resolves_images_beside_it(tmp_path: Path) -> None:
    _write(tmp_path / "mine/images/CIRR/Train/a.jpg", jpeg_bytes(1))
    src = _parquet(tmp_path / "mine" / "CIRR.parquet",
                   [{**_cirr_rows("x")[0], "qry_image_path": "images/CIRR/Train/a.jpg",
                     "pos_text": "a caption", "pos_image_path": ""}])
    report = prepare("mmeb_train", {"input": str(src)}, tmp_path / "o")
    assert report.datasets == {"CIRR": 1} and report.written == 1


# ----------------------------------------------------------------------------- v2 eval rows


def test_vlm2vec_v2_eval_rows_keep_their_instructions(tmp_path: Path) -> None:
    _write(tmp_path / "images/ImageNet-1K/q.JPEG", jpeg_bytes(1))
    for i in range(3):
        _write(tmp_path / f"images/MSCOCO_t2i/c{i}.jpg", png_bytes(i))
    cls = _parquet(tmp_path / "v2" / "ImageNet-1K" / "test-00000-of-00001.parquet", [{
        "qry_inst": "<|image_1|> Represent the given image for classification",
        "qry_text": "",
        "qry_img_path": "ImageNet-1K/q.JPEG",
        "tgt_text": ["tench", "goldfish"],
        "tgt_img_path": ["", ""],
    }])
    t2i = _parquet(tmp_path / "v2" / "MSCOCO_t2i" / "test-00000-of-00001.parquet", [{
        "qry_inst": "Find me an everyday image that matches the given caption:",
        "qry_text": "A man riding a wave on top of a surfboard.",
        "qry_img_path": "",
        "tgt_inst": "<|image_1|>\nRepresent the given image.",
        "tgt_text": ["", "", ""],
        "tgt_img_path": [f"MSCOCO_t2i/c{i}.jpg" for i in range(3)],
    }])
    args = {"image_root": str(tmp_path / "images")}
    prepare("mmeb_eval", {**args, "input": str(cls)}, tmp_path / "cls")
    (s,) = iter_samples(tmp_path / "cls")
    assert s.query.instruction == " Represent the given image for classification"
    assert s.query.text is None and s.query.image == jpeg_bytes(1)
    assert [c.text for c in s.candidates] == ["tench", "goldfish"]
    assert all(c.instruction is None for c in s.candidates)

    prepare("mmeb_eval", {**args, "input": str(t2i)}, tmp_path / "t2i")
    (s,) = iter_samples(tmp_path / "t2i")
    assert s.query.instruction == "Find me an everyday image that matches the given caption:"
    assert s.query.text == "A man riding a wave on top of a surfboard."
    assert [c.instruction for c in s.candidates] == ["\nRepresent the given image."] * 3
    assert [c.image for c in s.candidates] == [png_bytes(i) for i in range(3)]
    assert all(c.text is None for c in s.candidates)


def test_v2_instruction_marker_without_an_image_is_rejected(tmp_path: Path) -> None:
    src = _parquet(tmp_path / "X" / "test-00000-of-00001.parquet", [{
        "qry_inst": "<|image_1|> Represent the given image", "qry_text": "", "qry_img_path": "",
        "tgt_text": ["a"], "tgt_img_path": [""],
    }])
    report = prepare("mmeb_eval", {"input": str(src)}, tmp_path / "o", on_error="skip")
    assert report.rejected == {"missing_field": 1}
    reject = json.loads((tmp_path / "o" / "rejects.jsonl").read_text())
    assert "qry_inst has an <|image_1|> marker but qry_img_path is empty" in reject["detail"]


# ----------------------------------------------------------------------------- .json arrays


@pytest.mark.parametrize("source", ["mmeb_train", "mmeb_eval", "jsonl"])
def test_a_json_file_holding_an_array_is_read_as_an_array(tmp_path: Path, source: str) -> None:
    row = {
        "mmeb_train": {"qry": "q", "qry_image_path": "", "pos_text": "p", "pos_image_path": ""},
        "mmeb_eval": {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"],
                      "tgt_img_path": ["", ""]},
        "jsonl": {"query": "q", "pos": "p"},
    }[source]
    rows: list[Any] = [dict(row, **({"id": f"r{i}"} if source == "jsonl" else {}))
                       for i in range(10)]
    rows.insert(3, "not an object")
    path = tmp_path / "set.json"
    path.write_text(json.dumps(rows, indent=2))  # pretty-printed: many lines per row
    report = prepare(source, {"input": str(path)}, tmp_path / "o", on_error="skip")
    assert (report.read, report.written, report.rejected) == (11, 10, {"bad_row": 1})
    reject = json.loads((tmp_path / "o" / "rejects.jsonl").read_text())
    assert reject["line"] == 4 and "array element" in reject["detail"]


def test_a_json_lines_file_named_json_is_still_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text("".join(json.dumps({"id": f"r{i}", "query": "q", "pos": "p"}) + "\n"
                            for i in range(4)))
    assert prepare("jsonl", {"input": str(path)}, tmp_path / "o").written == 4


def test_a_broken_json_array_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text('[{"query": "q", "pos": "p"},\n {"query": ')
    with pytest.raises(DataError, match=r"set.json: the file starts with '\['.*not valid JSON"):
        prepare("jsonl", {"input": str(path)}, tmp_path / "o")


# ----------------------------------------------------------------------------- --help examples


def _example_commands(text: str, prefix: str) -> list[list[str]]:
    """The example command lines in a text that start with `prefix` (continuations joined,
    comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line.strip(), comments=True) for line in joined.splitlines()
            if line.strip().startswith(prefix)]


def _prepare_help() -> str:
    from mmemb.cli import cli

    return CliRunner().invoke(cli, ["prepare", "--help"]).output


DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


@pytest.mark.parametrize("where", ["mmemb prepare --help", "docs/data.md"])
def test_every_mmeb_example_runs_on_the_real_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from mmemb.cli import cli

    text = _prepare_help() if where.startswith("mmemb") else DOCS.read_text()
    commands = _example_commands(text, "mmemb prepare --source mmeb_")
    assert len(commands) >= 4, text  # MMEB-train files, folders and globs, and MMEB-eval
    for n, words in enumerate(commands):
        work = tmp_path / str(n)  # each example on its own copy: several write shards/cirr
        mmeb_train_tree(work / "MMEB-train")
        mmeb_eval_tree(work / "MMEB-eval")
        monkeypatch.chdir(work)
        result = CliRunner().invoke(cli, words[1:])
        assert result.exit_code == 0, f"{shlex.join(words)}\n{result.output}"
        assert re.search(r"read (\d+) = written \1 \+ rejected 0", result.output), (
            f"{shlex.join(words)}\n{result.output}"
        )

"""prepare(): bad-input handling in both modes, overwrite/atomicity, image handling, the CLI."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from mmemb.data.prepare import parse_shard_size, prepare
from mmemb.data.shards import iter_samples, read_manifest, verify_checksums
from mmemb.data.testing import jpeg_bytes, png_bytes
from mmemb.errors import DataError


def _dataset(tmp_path: Path) -> Path:
    """Images: good JPEG/PNG, garbage bytes, a truncated JPEG."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.jpg").write_bytes(jpeg_bytes(1))
    (img / "b.png").write_bytes(png_bytes(2))
    (img / "garbage.jpg").write_bytes(b"this is not an image at all")
    (img / "cut.jpg").write_bytes(jpeg_bytes(3)[:80])
    return img


GOOD = {"id": "g1", "query": "a caption", "pos": {"image": "a.jpg"}}
BAD_ROWS: dict[str, Any] = {
    "missing_image": {"id": "r1", "query": "q", "pos": {"image": "nope.jpg"}},
    "corrupt_image": {"id": "r2", "query": "q", "pos": {"image": "garbage.jpg"}},
    "missing_field": {"id": "r3", "query": "q"},
    "empty_text": {"id": "r4", "query": "   ", "pos": {"image": "a.jpg"}},
    "duplicate_id": {"id": "g1", "query": "another", "pos": "text"},
    "bad_row": "{this is not json",
}


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_counts_every_reason_exactly(tmp_path: Path) -> None:
    img = _dataset(tmp_path)
    rows = [
        GOOD,
        BAD_ROWS["missing_image"],
        BAD_ROWS["corrupt_image"],
        {"id": "r2b", "query": "q", "pos": "p", "neg": [{"image": "cut.jpg"}]},  # truncated JPEG
        BAD_ROWS["missing_field"],
        BAD_ROWS["empty_text"],
        BAD_ROWS["duplicate_id"],
        BAD_ROWS["bad_row"],
        {
            "id": "g2",
            "query": {"text": "q", "image": "b.png"},
            "pos": "p",
            "neg": [{"image": "a.jpg"}, "text neg"],
        },
    ]
    src = _write_jsonl(tmp_path / "rows.jsonl", rows)
    report = prepare(
        "jsonl", {"input": str(src), "image_root": str(img)}, tmp_path / "out", on_error="skip"
    )
    assert report.read == 9 and report.written == 2
    assert report.rejected == {
        "bad_row": 1,
        "corrupt_image": 2,
        "duplicate_id": 1,
        "empty_text": 1,
        "missing_field": 1,
        "missing_image": 1,
    }
    assert str(report).startswith("read 9 = written 2 + rejected 7 (bad_row: 1, corrupt_image: 2")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").open()]
    assert [(r["reason"], r["line"]) for r in rejects] == [
        ("missing_image", 2),
        ("corrupt_image", 3),
        ("corrupt_image", 4),
        ("missing_field", 5),
        ("empty_text", 6),
        ("duplicate_id", 7),
        ("bad_row", 8),
    ]
    assert all(r["file"] == str(src) for r in rejects)
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["read"], manifest["written"]) == (9, 2)
    assert manifest["rejected"] == report.rejected
    assert [s.id for s in iter_samples(tmp_path / "out")] == ["g1", "g2"]


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_fail_stops_at_the_first_bad_row_with_file_line_reason(tmp_path: Path, reason: str) -> None:
    img = _dataset(tmp_path)
    src = _write_jsonl(tmp_path / "rows.jsonl", [GOOD, BAD_ROWS[reason], GOOD | {"id": "later"}])
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        prepare("jsonl", {"input": str(src), "image_root": str(img)}, out)
    msg = str(exc.value)
    assert f"{src}:2: {reason}" in msg and "--on-error skip" in msg
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


def test_workers_give_the_same_output(tmp_path: Path) -> None:
    """Images checked in 2 worker processes: the same shards, rejects and counts, in order."""
    img = _dataset(tmp_path)
    rows: list[Any] = []
    for i in range(40):  # several chunks per worker, with rejects among them
        rows.append({"id": f"s{i}", "query": f"caption {i}",
                     "pos": {"image": ["a.jpg", "b.png", "garbage.jpg", "cut.jpg"][i % 4]},
                     "neg": [f"neg {i}"]})
    rows.insert(25, {"id": "s4", "query": "a duplicate", "pos": "p"})
    src = _write_jsonl(tmp_path / "rows.jsonl", rows)
    args = {"input": str(src), "image_root": str(img)}
    one = prepare("jsonl", args, tmp_path / "one", on_error="skip", shard_size=7)
    two = prepare("jsonl", args, tmp_path / "two", on_error="skip", shard_size=7, workers=2)
    assert (one.read, one.written, one.rejected) == (two.read, two.written, two.rejected)
    assert one.rejected == {"corrupt_image": 20, "duplicate_id": 1}
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")
    m1, m2 = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    for key in ("shards", "datasets", "read", "written", "rejected"):
        assert m1[key] == m2[key], key
    # fail mode names the same first bad row
    with pytest.raises(DataError, match=rf"{src}:3: corrupt_image"):
        prepare("jsonl", args, tmp_path / "fail", workers=2)
    assert not (tmp_path / "fail").exists() and not (tmp_path / "fail.partial").exists()


def test_refuses_existing_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("synthetic", {"n": 4}, out)
    with pytest.raises(DataError, match="--overwrite"):
        prepare("synthetic", {"n": 6}, out)
    assert read_manifest(out)["samples"] == 4
    report = prepare("synthetic", {"n": 6}, out, overwrite=True)
    assert report.written == 6 and read_manifest(out)["samples"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left


def test_never_replaces_a_directory_that_is_not_prepared_output(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="refusing"):
        prepare("synthetic", {"n": 2}, out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("synthetic", {"n": 3}, out)

    def interrupt(read: int, written: int, rejected: int) -> None:
        if read == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare("synthetic", {"n": 20}, out, overwrite=True, progress=interrupt)
    assert read_manifest(out)["samples"] == 3  # the old output is untouched
    assert not (tmp_path / "out.partial").exists()
    # a prepare killed outright leaves only its staging directory: the reader points it out,
    # and the rerun of the same prepare removes it (its writer is gone) and says so
    (tmp_path / "new.partial").mkdir()
    (tmp_path / "new.partial" / "synthetic_t2i-000000.tar").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="interrupted"):
        read_manifest(tmp_path / "new")
    report = prepare("synthetic", {"n": 3}, tmp_path / "new")
    assert report.written == 3 and not (tmp_path / "new.partial").exists()
    assert report.notes == [
        f"removed {tmp_path / 'new.partial'}, left by an interrupted prepare (no owner record)"
    ]
    assert str(report).splitlines()[0] == report.notes[0]  # told first; the result stays last
    assert str(report).splitlines()[-1].startswith("read 3 = written 3 + rejected 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # nothing else left


def test_images_keep_bytes_unless_downscaled(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.mkdir()
    big = io.BytesIO()
    Image.new("RGB", (100, 50), (10, 200, 30)).save(big, format="JPEG")
    (img / "big.jpg").write_bytes(big.getvalue())
    (img / "small.png").write_bytes(png_bytes(1, (20, 10)))
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, format="GIF")
    (img / "anim.gif").write_bytes(gif.getvalue())
    src = _write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"id": "1", "query": "q", "pos": {"image": "big.jpg"}},
            {"id": "2", "query": "q", "pos": {"image": "small.png"}},
            {"id": "3", "query": "q", "pos": {"image": "anim.gif"}},
        ],
    )
    prepare("jsonl", {"input": str(src), "image_root": str(img)}, tmp_path / "kept")
    kept = {s.id: s.pos.image for s in iter_samples(tmp_path / "kept")}
    assert kept["1"] == (img / "big.jpg").read_bytes()
    assert kept["2"] == (img / "small.png").read_bytes()
    assert kept["3"] is not None and kept["3"].startswith(b"\x89PNG")  # GIF -> PNG
    prepare(
        "jsonl", {"input": str(src), "image_root": str(img)}, tmp_path / "small", max_image_side=40
    )
    scaled = {s.id: s.pos.image for s in iter_samples(tmp_path / "small")}
    assert scaled["1"] is not None
    with Image.open(io.BytesIO(scaled["1"])) as im:
        assert im.size == (40, 20) and im.format == "JPEG"
    assert scaled["2"] == kept["2"]  # already small enough: untouched


def test_limit_dataset_name_and_shard_size(tmp_path: Path) -> None:
    report = prepare(
        "synthetic", {"n": 50}, tmp_path / "o", limit=20, dataset_name="shapes", shard_size=8
    )
    assert (report.read, report.written) == (20, 20)
    manifest = read_manifest(tmp_path / "o")
    assert list(manifest["datasets"]) == ["shapes"]
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["limit"] == 20 and manifest["source"] == {
        "name": "synthetic",
        "args": {"n": 50},
    }
    assert verify_checksums(tmp_path / "o") == []


def test_parse_shard_size() -> None:
    assert parse_shard_size(1000) == (1000, None)
    assert parse_shard_size("500MB") == (None, 500_000_000)
    assert parse_shard_size("1GiB") == (None, 1 << 30)
    for bad in ("lots", "0", "-5MB", "3XB"):
        with pytest.raises(DataError, match="shard size"):
            parse_shard_size(bad)


def test_unknown_source_and_bad_args(tmp_path: Path) -> None:
    from mmemb.errors import ConfigError, UnknownComponentError

    with pytest.raises(UnknownComponentError, match="Did you mean 'synthetic'"):
        prepare("synthetik", {}, tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown argument"):
        prepare("synthetic", {"nn": 3}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_prepare(tmp_path: Path) -> None:
    from mmemb.cli.prepare import command

    out = tmp_path / "shards"
    result = CliRunner().invoke(
        command,
        [
            "--source",
            "synthetic",
            "--arg",
            "n=12",
            "--arg",
            "tasks=[i2t]",
            "--out",
            str(out),
            "--shard-size",
            "5",
            "--log-every",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "read 12 = written 12 + rejected 0" in result.output
    assert "prepare: read 4 written 4 rejected 0" in result.output  # plain progress lines
    manifest = read_manifest(out)
    assert manifest["command"].startswith("mmemb prepare --source synthetic --out ")
    assert "--arg n=12" in manifest["command"]
    assert list(manifest["datasets"]) == ["synthetic_i2t"]
    result = CliRunner().invoke(command, ["--source", "synthetic", "--out", str(out)])
    assert isinstance(result.exception, DataError)  # the CLI group prints it as one line


def test_cli_input_and_image_root_reach_the_source(tmp_path: Path) -> None:
    from mmemb.cli.prepare import command

    img = _dataset(tmp_path)
    src = _write_jsonl(tmp_path / "rows.jsonl", [GOOD, BAD_ROWS["missing_image"]])
    result = CliRunner().invoke(
        command,
        [
            "--source",
            "jsonl",
            "--input",
            str(src),
            "--image-root",
            str(img),
            "--out",
            str(tmp_path / "o"),
            "--on-error",
            "skip",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "read 2 = written 1 + rejected 1 (missing_image: 1" in result.output


def test_cli_help_documents_every_source_with_an_example() -> None:
    from mmemb import plugins
    from mmemb.cli.prepare import command

    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    for name in plugins.available("source"):
        assert f"{name}: " in result.output
        assert f"mmemb prepare --source {name} " in result.output
    assert {"mmeb_train", "mmeb_eval", "jsonl", "image_folder", "synthetic"} <= set(
        plugins.available("source")
    )


def test_cli_prepares_every_sourced_entry_of_a_recipe(tmp_path: Path) -> None:
    from mmemb.cli.prepare import command

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "output_dir: runs/x\n"
        "data:\n"
        "  train:\n"
        f"    - {{shards: {tmp_path / 'train'}, source: synthetic, args: {{n: 6, seed: 1}}}}\n"
        "  eval:\n"
        f"    - {{shards: {tmp_path / 'eval'}, source: synthetic, "
        "args: {n: 4, split: eval}, limit: 3}\n"
        "model: {backbone: {name: anything}}\n"
        "train: {steps: 1, batch_size: 2}\n"
    )
    result = CliRunner().invoke(command, ["--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "train")["samples"] == 6
    assert read_manifest(tmp_path / "eval")["samples"] == 3  # the entry's limit
    again = CliRunner().invoke(command, ["--recipe", str(recipe)])
    assert again.exit_code == 0 and again.output.count("already prepared") == 2


def test_without_file_locks_a_stale_staging_is_judged_by_its_owner_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import subprocess
    import sys

    from mmemb.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_lock", lambda fd: None)  # a file system without flock
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    staging = tmp_path / "out.partial"

    def leave(pid: int, host: str) -> None:
        staging.mkdir(exist_ok=True)
        owner = {"pid": pid, "host": host, "started": "2025-01-01T00:00:00+00:00"}
        (staging / prepare_module.OWNER_NAME).write_text(json.dumps(owner))

    leave(os.getpid(), socket.gethostname())  # alive: this very process
    with pytest.raises(DataError, match=rf"is running now \(pid {os.getpid()} on "):
        prepare("synthetic", {"n": 2}, tmp_path / "out")
    leave(ended.pid, "another-node")  # cannot tell from here
    with pytest.raises(DataError, match=r"no locks .* If it is not, remove .*out.partial"):
        prepare("synthetic", {"n": 2}, tmp_path / "out")
    assert staging.is_dir()
    leave(ended.pid, socket.gethostname())  # ended, on this host
    report = prepare("synthetic", {"n": 2}, tmp_path / "out")
    assert report.written == 2 and not staging.exists()
    assert report.notes[0].startswith(f"removed {staging}, left by an interrupted prepare (pid "
                                       f"{ended.pid} on ")


def _label_rows(path: Path, labels: list[str]) -> Path:
    path.write_text("".join(
        json.dumps({"id": f"r{i}", "query": f"item number {i}", "pos": label}) + "\n"
        for i, label in enumerate(labels)
    ))
    return path


@pytest.mark.parametrize("classes", [2, 10])
def test_prepare_notes_a_train_set_grouped_by_its_positive(tmp_path: Path, classes: int) -> None:
    """Sorted by label, the stream's local shuffle cannot mix the classes: prepare says so."""
    import random

    labels = [f"class {k}" for k in range(classes) for _ in range(200 // classes)]
    grouped = prepare("jsonl", {"input": str(_label_rows(tmp_path / "g.jsonl", labels))},
                      tmp_path / "g")
    assert len(grouped.notes) == 1 and "grouped by their positive" in grouped.notes[0]
    assert "shuffle the input rows" in str(grouped)

    random.Random(0).shuffle(labels)
    mixed = prepare("jsonl", {"input": str(_label_rows(tmp_path / "m.jsonl", labels))},
                    tmp_path / "m")
    assert mixed.notes == []


def test_prepare_does_not_note_unique_positives_or_eval_sets(tmp_path: Path) -> None:
    unique = [f"caption {i}" for i in range(150)]
    report = prepare("jsonl", {"input": str(_label_rows(tmp_path / "u.jsonl", unique))},
                     tmp_path / "u")
    assert report.notes == []
    root = tmp_path / "tree"
    for k in range(3):
        for i in range(40):
            (root / f"c{k}").mkdir(parents=True, exist_ok=True)
            (root / f"c{k}" / f"{i}.png").write_bytes(png_bytes(k))
    in_order = prepare("image_folder", {"input": str(root), "shuffle": False, "kind": "eval"},
                       tmp_path / "e")
    assert in_order.notes == []  # an eval set's order does not matter
    assert prepare("image_folder", {"input": str(root), "shuffle": False},
                   tmp_path / "t").notes != []
    assert prepare("image_folder", {"input": str(root)}, tmp_path / "s").notes == []

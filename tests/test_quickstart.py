"""The quickstart pipeline end to end through the CLI: prepare (inside train), eval before,
train, eval after, save; then export, encode, eval, mine and validate on what train produced."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mmemb.cli import cli
from mmemb.data.shards import iter_samples, read_manifest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
SMALL = [
    "train.steps=4",
    "train.batch_size=4",
    "data.train.0.args.n=40",
    "data.eval.0.args.n=12",
    "eval.batch_size=16",
]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the (shortened) quickstart once in a fresh working directory."""
    cwd = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        out = invoke("train", QUICKSTART, *SMALL)
    finally:
        os.chdir(old)
    (cwd / "train.log").write_text(out)
    return cwd


def test_train_prints_scores_and_writes_outputs(trained: Path) -> None:
    log = (trained / "train.log").read_text()
    assert re.search(r"^P@1 before: \d+\.\d$", log, re.M), log
    assert re.search(r"^P@1 after: \d+\.\d$", log, re.M), log
    assert "63 negatives per query" not in log and "15 negatives per query" in log  # 4 x (1+3) - 1
    run = trained / "runs" / "quickstart"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    resolved = (run / "recipe.yaml").read_text()
    assert "overrides: train.steps=4" in resolved.splitlines()[0]
    assert (run / "model" / "mmemb.json").is_file()
    assert (run / "eval_before" / "results.json").is_file()
    assert (run / "eval_after" / "results.json").is_file()
    manifest = read_manifest(trained / "data" / "quickstart" / "train")
    assert manifest["samples"] == 40


def test_export_encode_eval_mine_on_the_trained_model(trained: Path) -> None:
    model = str(trained / "runs" / "quickstart" / "model")
    exported = trained / "exported"
    invoke("export", "--model", model, "--out", str(exported))
    assert (exported / "README.md").is_file() and (exported / "mmemb.json").is_file()
    assert list(exported.glob("*.safetensors"))

    items = trained / "items.jsonl"
    items.write_text(
        '{"text": "a red circle"}\n{"text": "a blue square", "instruction": "Find it."}\n'
    )
    invoke(
        "encode", "--model", str(exported), "--input", str(items), "--out", str(trained / "e.npy")
    )
    emb = np.load(trained / "e.npy")
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)

    eval_out = trained / "eval-cli"
    invoke(
        "eval",
        "--model",
        str(exported),
        "--data",
        str(trained / "data/quickstart/eval"),
        "--out",
        str(eval_out),
        "--no-progress",
    )
    cli_scores = json.loads((eval_out / "results.json").read_text())["datasets"]
    after = json.loads((trained / "runs/quickstart/eval_after/results.json").read_text())[
        "datasets"
    ]
    for name, result in after.items():  # the exported model scores exactly what training saw
        assert cli_scores[name]["metrics"] == result["metrics"]

    mined = trained / "mined"
    out = invoke(
        "mine",
        "--model",
        str(exported),
        "--data",
        str(trained / "data/quickstart/train"),
        "--out",
        str(mined),
        "--arg",
        "num_negatives=2",
        "--arg",
        "max_pos_ratio=null",
    )
    assert "mined 40 samples" in out
    samples = list(iter_samples(mined))
    assert len(samples) == 40 and all(len(s.negs) == 2 for s in samples)
    for s in samples:
        assert s.pos.content_hash() not in {n.content_hash() for n in s.negs}
    assert read_manifest(mined)["mining"]["stats"]


def test_validate_runs_one_step_without_touching_outputs(tmp_path: Path) -> None:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        out = invoke("validate", QUICKSTART, "train.batch_size=2")
    finally:
        os.chdir(old)
    assert "one training step ran: loss" in out and "The recipe is valid." in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
